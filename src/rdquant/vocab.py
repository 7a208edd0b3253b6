"""The vocabulary matrices in the budget: the token embedding and the output head, quantized after
the decoder blocks (issue 21). The head is solved with GPTQ on the Hessian of its input (the final
norm's output over the calibration windows, which the pipeline has at hand after the last block);
an untied embedding is rounded to its grid (its error does not pass through a Hessian we hold). A
tied pair is one matrix, quantized once for the head, and the embedding looks its rows up from the
same stored tensors (runtime.QuantEmbedding). Grids: symmetric, `embed_bits` wide, row-wise groups
of the run's group size along the hidden size (at 8 bits and groups of 32: llama.cpp's Q8_0).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import CompressConfig, LayerLog
from .hessian import HessianAccumulator
from .methods.gptq import gptq_quantize
from .methods.rtn import rtn_quantize
from .models import set_submodule
from .pipeline import layer_log
from .qtensor import QuantizedWeight
from .runtime import QuantEmbedding, QuantLinear

CHUNK_BYTES = 256 << 20  # float32 rows of a vocabulary matrix solved at once (an 8B head is 2 GiB)


def vocab_config(cfg: CompressConfig) -> CompressConfig:
    """GPTQ settings for the vocabulary matrices: the run's solver settings at `embed_bits`, symmetric."""
    group = cfg.group_size if cfg.group_size != 0 else 64
    return CompressConfig(method="gptq", bits=cfg.embed_bits, group_size=group, symmetric=True,
                          act_order=cfg.act_order, damp_percent=cfg.damp_percent, block_size=cfg.block_size,
                          clip_search=cfg.clip_search, max_shrink=cfg.max_shrink, scale_bits=cfg.scale_bits,
                          device=cfg.device)


def vocab_modules(model: nn.Module) -> tuple[str | None, nn.Module | None, str | None, nn.Module | None, bool]:
    """(embedding name, embedding, head name, head, tied): the head only when it is a plain Linear."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    if not isinstance(emb, nn.Embedding):
        emb = None
    if not isinstance(head, nn.Linear):
        head = None
    tied = emb is not None and head is not None and emb.weight is head.weight
    return (names.get(id(emb)) if emb is not None else None, emb,
            names.get(id(head)) if head is not None else None, head, tied)


def vocab_entries(model: nn.Module, cfg: CompressConfig) -> dict[str, dict]:
    """The manifest entries (`quantized` table) the run will write for the embedding and head, from the
    shapes alone: a tied pair is the embedding's entry with `tied_head`. Empty when they stay 16-bit."""
    if cfg.embed_bits == 16:
        return {}
    vcfg = vocab_config(cfg)
    emb_name, emb, head_name, head, tied = vocab_modules(model)
    out: dict[str, dict] = {}
    for name, mod, kind in ((head_name, head, "head"), (emb_name, emb, "embedding")):
        if mod is not None and not (tied and kind == "head"):
            out[name] = {"layout": "affine", "bits": vcfg.bits, "group_size": vcfg.group_size, "symmetric": True,
                         "shape": list(mod.weight.shape), "kind": kind, **({"tied_head": head_name} if tied and
                                                                            kind == "embedding" else {})}
    return out


def vocab_stored_bytes(model: nn.Module, cfg: CompressConfig) -> tuple[dict[str, int], int]:
    """({module name: stored bytes}, total) of the quantized embedding and head as `cfg` will store them
    (codes and fp16 scales; a tied pair once, its head at 0); empty when they stay 16-bit."""
    from .packing import packed_nbytes
    from .qtensor import num_groups

    out: dict[str, int] = {}
    for name, e in vocab_entries(model, cfg).items():
        rows, cols = e["shape"]
        out[name] = packed_nbytes(rows * cols, e["bits"]) + 2 * rows * num_groups(cols, e["group_size"])
        if "tied_head" in e:
            out[e["tied_head"]] = 0
    return out, sum(out.values())


def _quantize_rows(name: str, weight: torch.Tensor, H: torch.Tensor | None, vcfg: CompressConfig,
                   device: torch.device) -> tuple[QuantizedWeight, LayerLog]:
    """GPTQ against H (plain rounding without it) of a vocabulary matrix, CHUNK_BYTES of rows at a time:
    rows are independent given H, so the result is the whole matrix's while the device holds one chunk
    (and the codes collect on the CPU). Returns the weight and its log line over all rows."""
    rows, cols = weight.shape
    step = max(1, CHUNK_BYTES // (4 * cols))
    codes, scales, log = [], [], None
    for a in range(0, rows, step):
        W = weight[a : a + step].to(device, torch.float32)
        q, notes = gptq_quantize(W, H, vcfg) if H is not None else (rtn_quantize(W, vcfg), ["plain rounding"])
        part = layer_log(name, "gptq" if H is not None else "rtn", q, W, q.dequantize().to(W.device), H, notes)
        codes.append(q.codes.cpu())
        scales.append(q.scales.cpu())
        if log is None:
            log, part.shape, part.weight_mse = part, (rows, cols), part.weight_mse * W.shape[0] / rows
            continue
        log.weight_mse += part.weight_mse * W.shape[0] / rows
        if H is not None:
            log.proxy_error += part.proxy_error
            log.proxy_error_rtn += part.proxy_error_rtn
        log.notes += [n for n in part.notes if n not in log.notes]
        del W, q
    return QuantizedWeight(torch.cat(codes), torch.cat(scales), None, vcfg.bits, vcfg.group_size), log


@torch.no_grad()
def quantize_vocab(model: nn.Module, cfg: CompressConfig, head_inputs: list[torch.Tensor] | None,
                   dtype: torch.dtype, final_norm: nn.Module | None = None) -> list[LayerLog]:
    """Replace the embedding (QuantEmbedding) and the head (QuantLinear, kind "head") of `model` by
    their quantized forms; `head_inputs` are the last block's outputs per batch (None: plain rounding)."""
    if cfg.embed_bits == 16:
        return []
    vcfg = vocab_config(cfg)
    device = torch.device(cfg.device)
    emb_name, emb, head_name, head, tied = vocab_modules(model)
    logs: list[LayerLog] = []
    qhead = None
    if head is not None:
        H = None
        if head_inputs and cfg.method != "rtn":
            acc = HessianAccumulator(head.weight.shape[1], device=device)
            norm = final_norm.to(device) if final_norm is not None else nn.Identity()
            for h in head_inputs:
                acc.add(norm(h.to(device)))
            if final_norm is not None:
                final_norm.to("cpu")
            acc.check_finite(head_name or "the head")
            H = acc.H
        q, log = _quantize_rows(head_name, head.weight.data, H, vcfg, device)
        del H
        bias = head.bias.data if head.bias is not None else None
        qhead = QuantLinear.from_quantized(q, bias, dtype)
        qhead.kind, qhead.solver = "head", log.method
        logs.append(log)
        set_submodule(model, head_name, qhead.to("cpu"))
    if emb is not None:
        if tied and qhead is not None:
            qemb = QuantEmbedding(emb.num_embeddings, emb.embedding_dim, vcfg.bits, vcfg.group_size, True, dtype,
                                  "cpu", padding_idx=emb.padding_idx)
            for k in qhead.buffer_names:
                qemb._buffers[k] = qhead._buffers[k]  # one matrix: the very same stored tensors
            qemb.tied_head, qemb.solver = head_name, qhead.solver
        else:
            q, log = _quantize_rows(emb_name, emb.weight.data, None, vcfg, device)
            qemb = QuantEmbedding(emb.num_embeddings, emb.embedding_dim, vcfg.bits, vcfg.group_size, True, dtype,
                                  "cpu", padding_idx=emb.padding_idx)
            qemb.set_tensors({k: v.cpu() for k, v in q.packed_state().items()})
            qemb.solver = "rtn"
            log.notes = []
            logs.append(log)
        set_submodule(model, emb_name, qemb)
    return logs
