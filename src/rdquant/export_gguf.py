"""GGUF export (llama.cpp) of llama-architecture artifacts whose layers have an exact GGUF type: k-quant
layers (solved in the type's own grid with --grid gguf:TYPE, kquant.py) are written as the blocks they store;
affine codes in groups of 32: symmetric 4/5/8-bit codes are Q4_0 / Q5_0 / Q8_0 (w = d * (q - 2^(bits-1)), Q8_0's codes
stored signed); asymmetric 4/5-bit ones are Q4_1 / Q5_1 (w = d * q + m) when every block's offset
m = -z * d is an fp16 value, which holds when the scales keep few enough mantissa bits
(--scale-bits 6 at 4 bits, 5 at 5 bits). The fp16 group scale is the block's d, bit for bit. Embeddings and
the head are written in 16 bits, norms in 32. Query and key rows are permuted as llama.cpp's converter
does (its rotary layout). Tokenizer metadata comes from the source GGUF when the artifact was made from
one, else from a byte-level BPE tokenizer (tokens, merges, special ids)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import RdquantError

ARCHS = ("llama",)
LAYER_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


SYMMETRIC = {4: "Q4_0", 5: "Q5_0", 8: "Q8_0"}
ASYMMETRIC = {4: "Q4_1", 5: "Q5_1"}  # exact where each block's offset -z * d is an fp16 value
FILE_TYPE = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}  # general.file_type names the mostly-used type


def gguf_type(info: dict[str, Any]) -> str | None:
    """The GGUF type that can hold a quantized layer exactly, or None."""
    if info.get("layout") == "kquant" and "lowrank" not in info:  # solved in the type's own grid (--grid gguf:TYPE)
        return info["gguf_type"]
    if info.get("layout", "affine") != "affine" or "lowrank" in info or info["group_size"] != 32:
        return None
    return (SYMMETRIC if info["symmetric"] else ASYMMETRIC).get(info["bits"])


def check(manifest: dict[str, Any], config: dict[str, Any]) -> dict[str, str]:
    """Each quantized layer's GGUF type, or an RdquantError naming the first layer without one."""
    arch = config.get("model_type")
    if arch not in ARCHS:
        raise RdquantError(f"GGUF export writes {', '.join(ARCHS)} models; this artifact is {arch!r}")
    types, bad = {}, []
    for name, info in manifest["quantized"].items():
        t = gguf_type(info)
        if t is None or info["shape"][1] % (256 if info.get("layout") == "kquant" else 32):
            layout = info.get("layout", "affine")
            what = (f"its {layout} layout" if layout != "affine" else "its low-rank adapters" if "lowrank" in info else
                    f"{'symmetric' if info['symmetric'] else 'asymmetric'} {info['bits']}-bit codes in groups of "
                    f"{info['group_size']}")
            bad.append((name, f"{what} have no exact GGUF type (exact: 4-, 5- or 8-bit codes in groups of 32: "
                              "Q4_0 / Q5_0 / Q8_0, asymmetric Q4_1 / Q5_1; the k-quants of --grid gguf:TYPE); compress with "
                              "--bits 4 --group-size 32 or --grid gguf:Q4_K"))
        else:
            types[name] = t
    if bad:
        more = f" (and {len(bad) - 1} more layers)" if len(bad) > 1 else ""
        raise RdquantError(f"cannot export layer {bad[0][0]} to gguf: {bad[0][1]}{more}")
    return types


def _permute(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's row order for query / key projections (rotary halves interleaved per head)."""
    return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def _f16_bytes(t: torch.Tensor, shape: tuple[int, ...]) -> np.ndarray:
    return t.to(torch.float16).contiguous().numpy().view(np.uint8).reshape(*shape, 2)


def _blocks(qw, gtype: str, name: str) -> np.ndarray:
    """The layer's rows as GGUF blocks (ggml's layouts). k-quants: the blocks the layer stores. Blocks of 32:
    fp16 d, for Q4_1 / Q5_1 fp16 m, for Q5_* the 32 fifth bits (uint32), then the low nibbles (code j in byte
    j's low half, code j + 16 in its high half) or, for Q8_0, signed bytes."""
    if getattr(qw, "layout", "affine") == "kquant":
        return qw.blocks().numpy()
    out_f, in_f = qw.shape
    nb = in_f // 32
    parts = [_f16_bytes(qw.scales, (out_f, nb))]
    codes = qw.codes.to(torch.int32).reshape(out_f, nb, 32)
    if gtype in ("Q4_1", "Q5_1"):  # w = d * q + m: m = -z * d must be an fp16 value
        z = qw.zero_points().to(torch.float32)
        m = -z * qw.scales.to(torch.float32)
        if not torch.equal(m.to(torch.float16).to(torch.float32), m):
            raise RdquantError(f"cannot export layer {name} to gguf {gtype}: a block's offset -zero x scale is not an "
                               f"fp16 value; compress with --scale-bits {6 if gtype == 'Q4_1' else 5} (fewer scale bits make "
                               "it exact)")
        parts.append(_f16_bytes(m, (out_f, nb)))
    if gtype == "Q8_0":
        parts.append((codes - 128).to(torch.int8).numpy().view(np.uint8))
    else:
        if gtype.startswith("Q5"):
            high = ((codes >> 4) & 1).to(torch.int64)  # bit j of qh: the fifth bit of code j
            qh = (high << torch.arange(32, dtype=torch.int64)).sum(-1)
            parts.append(qh.numpy().astype("<u4").view(np.uint8).reshape(out_f, nb, 4))
        lo = codes & 0xF
        parts.append((lo[..., :16] | (lo[..., 16:] << 4)).to(torch.uint8).numpy())
    return np.concatenate(parts, axis=-1).reshape(out_f, -1)


def write(model, manifest: dict[str, Any], types: dict[str, str], tokenizer, path: Path, source_gguf: Path | None) -> None:
    """The GGUF file at `path` (model: rdquant.load's, with QuantLinear layers)."""
    import gguf

    from .runtime import QuantLinear

    cfg = model.config
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(str(manifest.get("source_model", "rdquant")))
    w.add_string("general.quantized_by", "rdquant")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or (cfg.rope_parameters or {}).get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(head_dim)
    common = max(set(types.values()), key=list(types.values()).count)
    w.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{FILE_TYPE.get(common, common)}"))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _tokenizer_metadata(w, tokenizer, source_gguf)
    vocab = {n: info.get("kind") for n, info in manifest["quantized"].items() if info.get("kind", "linear") != "linear"}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear) and name in vocab:  # a quantized embedding (and tied head) or head
            gname = "token_embd.weight" if vocab[name] == "embedding" else "output.weight"
            w.add_tensor(gname, _blocks(m.quantized_weight(), types[name], name),
                         raw_dtype=getattr(gguf.GGMLQuantizationType, types[name]))
        elif isinstance(m, QuantLinear) and getattr(m, "kind", "linear") == "linear":
            i, _, rest = name.removeprefix("model.layers.").partition(".")
            qw = m.quantized_weight()
            if rest == "self_attn.q_proj":
                qw = _rows(qw, n_head)
            elif rest == "self_attn.k_proj":
                qw = _rows(qw, n_kv)
            w.add_tensor(f"blk.{i}.{LAYER_NAMES[rest]}.weight", _blocks(qw, types[name], name),
                         raw_dtype=getattr(gguf.GGMLQuantizationType, types[name]))
    for name, t in model.state_dict().items():
        if name.startswith("model.layers."):
            i, _, rest = name.removeprefix("model.layers.").partition(".")
            key = rest.removesuffix(".weight")
            if key in LAYER_NAMES and "norm" in LAYER_NAMES[key]:
                w.add_tensor(f"blk.{i}.{LAYER_NAMES[key]}.weight", t.float().numpy())
        elif name == "model.embed_tokens.weight":
            w.add_tensor("token_embd.weight", t.half().numpy())
        elif name == "model.norm.weight":
            w.add_tensor("output_norm.weight", t.float().numpy())
        elif name == "lm_head.weight" and not getattr(cfg, "tie_word_embeddings", False):
            w.add_tensor("output.weight", t.half().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _rows(qw, n_head: int):
    """The weight object with its rows (codes, scales, zero points) in llama.cpp's rotary order."""
    from .kquant import KParams, KQuantWeight
    from .qtensor import QuantizedWeight

    if isinstance(qw, KQuantWeight):
        p = qw.params
        perm = lambda t: None if t is None else _permute(t, n_head)
        return KQuantWeight(_permute(qw.codes, n_head), KParams(perm(p.d), perm(p.dmin), perm(p.sc), perm(p.m)), qw.type)

    zeros = None if qw.zeros is None else _permute(qw.zeros, n_head)
    return QuantizedWeight(_permute(qw.codes, n_head), _permute(qw.scales, n_head), zeros, qw.bits, qw.group_size)


def _tokenizer_metadata(w, tokenizer, source_gguf: Path | None) -> None:
    """tokenizer.* keys: copied from the source GGUF, else a byte-level BPE's vocabulary and merges."""
    import gguf

    if source_gguf is not None:
        r = gguf.GGUFReader(str(source_gguf))
        for key, f in r.fields.items():
            if not key.startswith("tokenizer."):
                continue
            vtype = f.types[0]
            if vtype == gguf.GGUFValueType.ARRAY:
                w.add_array(key, f.contents())
            else:
                w.add_key_value(key, f.contents(), vtype)
        return
    import json

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise RdquantError(f"GGUF export writes byte-level BPE tokenizers (or copies a source GGUF's); this one is "
                           f"{spec['model']['type']}")
    vocab = spec["model"]["vocab"]
    tokens = [None] * len(tokenizer)
    for t, i in {**vocab, **{a["content"]: a["id"] for a in spec.get("added_tokens", [])}}.items():
        if i < len(tokens):
            tokens[i] = t
    special = set(tokenizer.all_special_ids)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)])
    w.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))])
    w.add_token_merges(merges)
    for attr, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                      ("unk_token_id", w.add_unk_token_id), ("pad_token_id", w.add_pad_token_id)):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            add(int(v))
