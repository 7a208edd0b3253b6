"""Export to compressed-tensors (pack-quantized): symmetric exports load with transformers and give the
artifact's logits within fp16 rounding; every exported layer decompresses, with compressed-tensors' own
decompressor, to the artifact's dequantized weight (asymmetric ones too: transformers cannot load those
yet, an upstream bug); what the format cannot hold is refused by layer name before anything is written."""

from __future__ import annotations

import json

import pytest
import torch

import rdquant
from rdquant.errors import RdquantError

pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed (it is in the test extra)")


def _same_logits(art, model, tol: float = 2e-3) -> None:
    """The exported model's logits equal the artifact's (rdquant.load) within fp16 rounding."""
    ref = rdquant.load(art, backend="reference")
    x = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        a, b = ref(x).logits, model(x).logits.float()
    assert float((a - b).abs().max()) <= tol * float(a.abs().max())


def _artifact(tiny_model_dir, tmp_path, name, **cfg):
    cfg = rdquant.CompressConfig(calib_samples=2, calib_seqlen=16, **{"embed_bits": 16, **cfg})  # linears only
    return rdquant.compress(str(tiny_model_dir), cfg, progress=False).save(tmp_path / name)


@pytest.mark.parametrize("bits,group", [(4, 32), (3, 32), (2, -1)])
def test_symmetric_export_loads_with_transformers(tiny_model_dir, tmp_path, bits, group):
    from transformers import AutoModelForCausalLM

    art = _artifact(tiny_model_dir, tmp_path, "a", bits=bits, group_size=group, symmetric=True)
    out = rdquant.export(art, tmp_path / "ct", progress=False)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "pack-quantized" and cfg["config_groups"]["group_0"]["weights"]["num_bits"] == bits
    _same_logits(art, AutoModelForCausalLM.from_pretrained(out))


def test_every_layer_decompresses_to_the_artifacts_weight(tiny_model_dir, tmp_path):
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    from rdquant.runtime import QuantLinear

    art = _artifact(tiny_model_dir, tmp_path, "a", bits=4, group_size=32)  # asymmetric (the default)
    out = rdquant.export(art, tmp_path / "ct", progress=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    scheme = QuantizationScheme.model_validate(qc["config_groups"]["group_0"])
    assert scheme.weights.symmetric is False and "lm_head" in qc["ignore"]
    tensors = load_file(out / "model.safetensors")
    ref = rdquant.load(art, backend="reference")
    layers = {n: m for n, m in ref.named_modules() if isinstance(m, QuantLinear)}
    for name, m in layers.items():
        sd = {k.rpartition(".")[2]: v for k, v in tensors.items() if k.rpartition(".")[0] == name}
        W = PackedQuantizationCompressor.decompress(sd, scheme)["weight"].float()
        assert float((W - m.quantized_weight().dequantize()).abs().max()) <= 1e-3, name
    assert all(k in tensors for k in ("model.embed_tokens.weight", "model.norm.weight"))


def test_what_the_format_cannot_hold_is_refused_by_name(tiny_model_dir, tmp_path):
    ragged = _artifact(tiny_model_dir, tmp_path, "g64", bits=4, group_size=64)  # 160-wide rows
    with pytest.raises(RdquantError, match=r"layer model\.layers\.0\.mlp\.down_proj .*160 input columns .*"
                                           r"--group-size 32 \(and 2 more layers\)"):
        rdquant.export(ragged, tmp_path / "x")
    claq = _artifact(tiny_model_dir, tmp_path, "claq", method="claq", target_bits=3.1)
    with pytest.raises(RdquantError, match="codebook layout .* has no compressed-tensors scheme"):
        rdquant.export(claq, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(RdquantError, match="not an rdquant artifact"):
        rdquant.export(tiny_model_dir, tmp_path / "x")
    with pytest.raises(RdquantError, match="unknown export format 'gguf2'"):
        rdquant.export(ragged, tmp_path / "x", format="gguf2")


def test_export_never_replaces_what_it_did_not_write(tiny_model_dir, tmp_path):
    art = _artifact(tiny_model_dir, tmp_path, "a", bits=4, group_size=32, symmetric=True)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(RdquantError, match="not an rdquant artifact: rdquant never deletes it"):
        rdquant.export(art, mine, overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep"
    out = rdquant.export(art, tmp_path / "ct", progress=False)
    with pytest.raises(RdquantError, match="pass --overwrite"):
        rdquant.export(art, out)
    assert rdquant.export(art, out, overwrite=True, progress=False) == out


def test_cli_export(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from rdquant.cli import app

    art = _artifact(tiny_model_dir, tmp_path, "a", bits=4, group_size=32, symmetric=True)
    r = CliRunner().invoke(app, ["export", str(art), "--format", "compressed-tensors", "--out", str(tmp_path / "ct")])
    assert r.exit_code == 0 and "exported" in r.output, r.output
    r = CliRunner().invoke(app, ["export", str(art), "--format", "onnx", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "unknown export format 'onnx'" in r.output


def _read_gptq_stream(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The GPTQ format's packing read bit by bit, as its documentation states it: along dim 0 of
    `words` (int32), 32 codes fill `bits` words as one LSB-first bit stream."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    out = torch.zeros((n,) + tuple(w.shape[1:]), dtype=torch.int64)
    for i in range(n):
        for b in range(bits):
            bit = i * bits + b
            out[i] |= ((w[bit // 32] >> (bit % 32)) & 1) << b
    return out


@pytest.mark.parametrize("bits,symmetric", [(4, False), (3, False), (2, True), (8, False)])
def test_gptq_export_follows_the_documented_layout(tiny_model_dir, tmp_path, bits, symmetric):
    from safetensors.torch import load_file

    from rdquant.runtime import QuantLinear

    art = _artifact(tiny_model_dir, tmp_path, "a", bits=bits, group_size=32, symmetric=symmetric)
    out = rdquant.export(art, tmp_path / "gptq", format="gptq", progress=False)
    qc = json.loads((out / "quantize_config.json").read_text())
    assert qc["bits"] == bits and qc["group_size"] == 32 and qc["sym"] is symmetric and qc["desc_act"] is False
    assert json.loads((out / "config.json").read_text())["quantization_config"] == qc
    v1 = qc["checkpoint_format"] == "gptq"
    t = load_file(out / "model.safetensors")
    ref = rdquant.load(art, backend="reference")
    for name, m in ((n, m) for n, m in ref.named_modules() if isinstance(m, QuantLinear)):
        out_f, in_f = m.out_features, m.in_features
        codes = _read_gptq_stream(t[f"{name}.qweight"], bits, in_f)  # [in, out]
        zeros = _read_gptq_stream(t[f"{name}.qzeros"].t(), bits, out_f).t() + (1 if v1 else 0)  # [groups, out]
        g_idx = t[f"{name}.g_idx"].to(torch.long)
        W = (codes - zeros[g_idx]).to(torch.float32) * t[f"{name}.scales"].float()[g_idx]
        assert torch.equal(W.t(), m.quantized_weight().dequantize()), name


def test_gptq_export_refuses_what_it_cannot_pack(tiny_model_dir, tmp_path):
    art = _artifact(tiny_model_dir, tmp_path, "a", bits=5, group_size=32)
    with pytest.raises(RdquantError, match=r"to gptq: 5-bit codes \(the GPTQ format packs 2, 3, 4, 8 bits\)"):
        rdquant.export(art, tmp_path / "x", format="gptq")


def test_a_zero_point_of_zero_switches_gptq_to_its_v2_convention():
    """v1 stores zero points less one, which a zero point of 0 cannot survive: such layers are written
    in GPTQModel's v2 convention (zero points as they are), and the config says so."""
    from rdquant.export import Scheme, _gptq_config, _pack_gptq
    from rdquant.qtensor import QuantizedWeight

    codes = torch.randint(0, 16, (32, 64), dtype=torch.uint8)
    zeros = torch.full((32, 2), 5, dtype=torch.uint8)
    zeros[3, 1] = 0
    s = Scheme(4, 32, False)
    tensors, v2 = _pack_gptq(QuantizedWeight(codes, torch.ones(32, 2).half(), zeros, 4, 32), s)
    assert v2 and int(tensors["qzeros"][1, 0] >> 12 & 0xF) == 0  # output row 3 of group 1, stored as is
    assert _gptq_config({"a": s}, v2)["checkpoint_format"] == "gptq_v2"
    _, v2 = _pack_gptq(QuantizedWeight(codes, torch.ones(32, 2).half(), zeros.clamp_min(1), 4, 32), s)
    assert not v2


@pytest.mark.parametrize("bits,symmetric,gtype,embed", [(4, True, "Q4_0", 16), (5, True, "Q5_0", 16), (8, True, "Q8_0", 16),
                                                        (4, False, "Q4_1", 16), (5, False, "Q5_1", 16),
                                                        (4, True, "Q4_0", 8)])
def test_gguf_export_loads_with_transformers_and_gives_the_same_logits(tiny_model_dir, tmp_path, bits, symmetric, gtype,
                                                                       embed):
    """Q4_0 / Q5_0 / Q8_0 hold symmetric group-32 codes exactly, Q4_1 / Q5_1 asymmetric ones whose offsets
    are fp16 values (few scale bits); query/key rows in llama.cpp's rotary order: transformers' GGUF
    loader (which reverses that order) gives the artifact's logits."""
    import gguf
    from transformers import AutoModelForCausalLM

    if json.loads((tiny_model_dir / "config.json").read_text())["model_type"] != "llama":
        pytest.skip("GGUF export writes llama models")
    kw = {} if symmetric else {"scale_bits": 6 if bits == 4 else 5}
    art = _artifact(tiny_model_dir, tmp_path, "a", bits=bits, group_size=32, symmetric=symmetric, embed_bits=embed, **kw)
    out = rdquant.export(art, tmp_path / "m.gguf", format="gguf")
    r = gguf.GGUFReader(str(out))
    types = {t.name: t.tensor_type.name for t in r.tensors}
    vocab = "F16" if embed == 16 else "Q8_0"  # 8-bit symmetric groups of 32: Q8_0, exactly
    assert types["blk.0.attn_q.weight"] == gtype and types["token_embd.weight"] == vocab
    assert types.get("output.weight", vocab) == vocab
    assert r.fields["tokenizer.ggml.model"].contents() == "gpt2" and r.fields["general.quantized_by"].contents() == "rdquant"
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name)
    ref = rdquant.load(art, backend="reference")
    x = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        a, b = ref(x).logits, model(x).logits.float()
    assert float((a - b).abs().max()) <= 1e-5 * float(a.abs().max())
    with pytest.raises(RdquantError, match="exists; pass --overwrite"):
        rdquant.export(art, out, format="gguf")
    assert rdquant.export(art, out, format="gguf", overwrite=True) == out


def test_gguf_export_refuses_what_has_no_exact_type(tiny_model_dir, tmp_path):
    if json.loads((tiny_model_dir / "config.json").read_text())["model_type"] != "llama":
        sym = _artifact(tiny_model_dir, tmp_path, "s", bits=4, group_size=32, symmetric=True)
        with pytest.raises(RdquantError, match="GGUF export writes llama models; this artifact is 'qwen2'"):
            rdquant.export(sym, tmp_path / "x.gguf", format="gguf")
        return
    art = _artifact(tiny_model_dir, tmp_path, "a", bits=3, group_size=32)
    with pytest.raises(RdquantError, match=r"to gguf: asymmetric 3-bit codes in groups of 32 have no exact GGUF type .*"
                                           r"--bits 4 --group-size 32"):
        rdquant.export(art, tmp_path / "m.gguf", format="gguf")
    full = _artifact(tiny_model_dir, tmp_path, "f", bits=4, group_size=32, scale_bits=10)  # offsets not in fp16
    with pytest.raises(RdquantError, match=r"to gguf Q4_1: a block's offset .* --scale-bits 6"):
        rdquant.export(full, tmp_path / "m.gguf", format="gguf")
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "m.gguf.partial").exists()
    with pytest.raises(RdquantError, match="ending in .gguf"):
        rdquant.export(art, tmp_path / "m", format="gguf")
    (tmp_path / "mine.gguf").write_bytes(b"not mine")
    sym = _artifact(tiny_model_dir, tmp_path, "s", bits=4, group_size=32, symmetric=True)
    with pytest.raises(RdquantError, match="rdquant did not write it and will not replace it"):
        rdquant.export(sym, tmp_path / "mine.gguf", format="gguf", overwrite=True)
    assert (tmp_path / "mine.gguf").read_bytes() == b"not mine"


def test_compress_exports_in_one_go_and_refuses_before_calibrating(tiny_model_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import rdquant.cli as cli

    llama = json.loads((tiny_model_dir / "config.json").read_text())["model_type"] == "llama"
    base = ["compress", "--model", str(tiny_model_dir), "--calib-samples", "2", "--calib-seqlen", "16", "--no-progress"]
    r = CliRunner().invoke(cli.app, base + ["--bits", "4", "--group-size", "32", "--symmetric", "--out", str(tmp_path / "e"),
                                            "--export", "compressed-tensors"])
    assert r.exit_code == 2 and "the quantized head" in r.output and "--embed-bits 16" in r.output  # before calibrating
    assert not (tmp_path / "e").exists()
    base += ["--embed-bits", "16"]
    r = CliRunner().invoke(cli.app, base + ["--bits", "4", "--group-size", "32", "--symmetric", "--out", str(tmp_path / "a"),
                                            "--export", "compressed-tensors"] + (["--export", "gguf"] if llama else []))
    assert r.exit_code == 0, r.output
    assert (tmp_path / "a-compressed-tensors" / "config.json").is_file() and (tmp_path / "a.gguf").is_file() == llama
    called = []
    monkeypatch.setattr(rdquant, "compress", lambda *a, **k: called.append(1))
    r = CliRunner().invoke(cli.app, base + ["--bits", "3", "--group-size", "64", "--out", str(tmp_path / "b"),
                                            "--export", "compressed-tensors"])
    assert r.exit_code == 2 and "cannot export layer" in r.output and "--group-size 32" in r.output
    assert not called and not (tmp_path / "b").exists()
    r = CliRunner().invoke(cli.app, base + ["--out", str(tmp_path / "c"), "--export", "onnx"])
    assert r.exit_code == 2 and "--export 'onnx': choose one of" in r.output


def test_inspect_says_where_an_artifact_can_be_exported(tiny_model_dir, tmp_path):
    art = _artifact(tiny_model_dir, tmp_path, "a", bits=3, group_size=64)
    ex = rdquant.inspect(art, decode_speed=False).exports
    assert ex["gptq"] == "yes" and ex["compressed-tensors"].startswith("no: ") and "--group-size 32" in ex["compressed-tensors"]
    assert ex["gguf"].startswith("no: ")


@pytest.mark.parametrize("recipe", [{"kv_shift": True}, {"kv_crr": 1}, {}])
def test_kv_folds_in_biases_refuse_export(recipe):
    """KV shifts folded into v_proj / o_proj biases (--kv-shift, --kv-crr) have no place in the formats."""
    from rdquant.export import check_kv

    manifest = {"kv_cache": {"bits": 4}, "recipe": {"kv_shift": False, "kv_crr": 0, **recipe}}
    if recipe:
        with pytest.raises(RdquantError, match="--kv-shift and --kv-crr"):
            check_kv(manifest, "gguf")
    else:
        check_kv(manifest, "gguf")


def test_vllm_check_follows_vllms_kernel_rules():
    from rdquant.export import Scheme, vllm_check

    def layers(shape, **schemes):
        q = {f"model.layers.0.{n}": {"shape": list(shape)} for n in
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")}
        s = {n: Scheme(4, 128, True) for n in q}
        s.update({f"model.layers.0.{k.replace('__', '.')}": v for k, v in schemes.items()})
        return q, s

    assert vllm_check(*layers((4096, 4096))) == "yes"
    three = {n: Scheme(3, 128, True) for n in ("self_attn__q_proj", "self_attn__k_proj", "self_attn__v_proj")}
    assert vllm_check(*layers((4096, 4096), **three)).startswith("0.34 and later only: model.layers.0.self_attn.q_proj has 3-bit")
    assert "asymmetric 8-bit" in vllm_check(*layers((4096, 4096), **{n: Scheme(8, 128, False) for n in
                                                                       ("self_attn__q_proj", "self_attn__k_proj", "self_attn__v_proj")}))
    assert vllm_check(*layers((576, 576))).startswith("0.34 and later only: model.layers.0.self_attn.q_proj is 576x576")
    assert vllm_check(*layers((4096, 4096), mlp__up_proj=Scheme(4, 96, True))).startswith("no: model.layers.0.mlp.up_proj has groups of 96")
    verdict = vllm_check(*layers((4096, 4096), self_attn__v_proj=Scheme(8, 128, True)))
    assert verdict.startswith("no: model.layers.0.self_attn.{q_proj,k_proj,v_proj} differ in scheme")


def test_cvxq_layer_widths_export_to_compressed_tensors_and_load(tiny_model_dir, tmp_path):
    """CVXQ with one width per linear (--cells layer): each width a config group; q/k/v and gate/up share one
    (vLLM fuses them); symmetric exports load in transformers with the artifact's logits."""
    from transformers import AutoModelForCausalLM

    art = _artifact(tiny_model_dir, tmp_path, "x", method="cvxq", cvxq_cells="layer", target_bits=4.25, group_size=32,
                    symmetric=True, cvxq_samples=2, clip_search=5)
    q = json.loads((art / "manifest.json").read_text())["quantized"]
    for i in range(3):
        p = f"model.layers.{i}."
        assert len({q[p + f"self_attn.{n}_proj"]["bits"] for n in "qkv"}) == 1
        assert q[p + "mlp.gate_proj"]["bits"] == q[p + "mlp.up_proj"]["bits"]
    assert all(e.get("layout", "affine") == "affine" for e in q.values())
    report = rdquant.inspect(art)
    assert report.bits_per_weight <= 4.25 and report.exports["compressed-tensors"].startswith("yes")
    out = rdquant.export(art, tmp_path / "ct", progress=False)
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    assert {g["weights"]["num_bits"] for g in groups.values()} == {e["bits"] for e in q.values()}
    _same_logits(art, AutoModelForCausalLM.from_pretrained(out))
