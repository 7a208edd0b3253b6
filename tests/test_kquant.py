"""llama.cpp k-quants (kquant.py, layouts.KQuant, --grid gguf:TYPE): the blocks rdquant writes dequantize, with
the `gguf` package's own reader, to rdquant's values exactly; GPTQ in a k-quant grid beats rounding in the same
grid; rows that are not whole super-blocks take llama.cpp's fallback type; an artifact solved in a k-quant
grid loads, codes, and exports to a GGUF file whose logits in transformers equal rdquant's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import rdquant
from rdquant import kquant
from rdquant.config import CompressConfig
from rdquant.errors import RdquantError
from rdquant.methods.gptq import gptq_quantize, proxy_error
from rdquant.methods.rtn import rtn_quantize
from rdquant.testing import save_tiny_model_dir

TYPES = tuple(kquant.TYPES)


def _weights(rows: int = 12, cols: int = 512, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g) * 0.1
    W[0, :16] *= 30  # an outlier sub-block
    W[1, 256:] = 0  # an all-zero super-block
    W[2, :32] = -W[2, :32].abs()  # one-signed sub-blocks
    W[3, 32:64] = W[3, 32:64].abs()
    return W


@pytest.mark.parametrize("name", TYPES)
def test_blocks_read_back_exactly_with_the_gguf_package(name):
    import gguf

    kt = kquant.TYPES[name]
    W = _weights()
    qw = kquant.quantize_rtn(W, name)
    blocks = qw.blocks()
    assert blocks.shape == (12, 2 * kt.block_bytes) and blocks.dtype == torch.uint8
    theirs = gguf.quants.dequantize(blocks.numpy(), getattr(gguf.GGMLQuantizationType, name))
    assert np.array_equal(theirs, qw.dequantize().numpy())  # bit for bit, ggml's order of operations
    codes, p = kquant.unpack_blocks(blocks, 12, 512, kt)
    assert torch.equal(codes, qw.codes) and torch.equal(p.sc, qw.params.sc) and torch.equal(p.d, qw.params.d)
    assert int(codes.max()) <= kt.max_code and float(qw.dequantize()[1, 256:].abs().max()) == 0
    rel = float((qw.dequantize() - W).square().sum() / W.square().sum())
    assert rel < {2: 0.15, 3: 0.04, 4: 0.01, 5: 0.003, 6: 0.001}[kt.bits]
    with pytest.raises(ValueError, match="blocks have"):
        kquant.unpack_blocks(blocks[:, :-1], 12, 512, kt)


@pytest.mark.parametrize("name", ("Q2_K", "Q3_K", "Q4_K", "Q6_K"))
@pytest.mark.parametrize("act_order", (True, False))
def test_gptq_in_a_kquant_grid_beats_rounding_in_it(name, act_order):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(1024, 512, generator=g) @ (torch.eye(512) + 0.5 * torch.randn(512, 512, generator=g) / 512**0.5)
    H = X.t() @ X / 1024
    W = _weights(32)
    cfg = CompressConfig(grid=f"gguf:{name}", act_order=act_order)
    qw, notes = gptq_quantize(W, H, cfg)
    assert isinstance(qw, kquant.KQuantWeight) and qw.type == name and not notes
    rtn = rtn_quantize(W, CompressConfig(method="rtn", grid=f"gguf:{name}"), torch.diagonal(H))
    assert proxy_error(W, qw.dequantize(), H) < 0.95 * proxy_error(W, rtn.dequantize(), H)
    # what the sweep returns is what the blocks hold
    assert torch.equal(kquant.KQuantWeight.from_packed(qw.packed_state(), (32, 512), name).dequantize(), qw.dequantize())
    top = qw.rows(0, 5)
    assert torch.equal(top.dequantize(), qw.dequantize()[:5])


def test_rows_that_are_not_whole_superblocks_take_the_fallback_type():
    H = torch.eye(576)
    for name, (bits, symmetric, _) in kquant.FALLBACK.items():
        qw, _ = gptq_quantize(torch.randn(8, 576), H, CompressConfig(grid=f"gguf:{name}"))
        assert (type(qw).__name__, qw.bits, qw.group_size, qw.symmetric) == ("QuantizedWeight", bits, 32, symmetric)
    qw = rtn_quantize(torch.randn(8, 576), CompressConfig(method="rtn", grid="gguf:Q4_K"))
    assert (qw.bits, qw.group_size, qw.symmetric) == (5, 32, True)


def test_grid_options_are_checked():
    from rdquant.config import from_settings

    with pytest.raises(RdquantError, match="bits is not used by method gptq with --grid gguf:Q4_K .*; remove it"):
        from_settings({}, {"grid": "gguf:Q4_K", "bits": 3})
    with pytest.raises(RdquantError, match="grid is not used by method claq"):
        from_settings({}, {"grid": "gguf:Q4_K", "method": "claq", "target_bits": 3.0})
    with pytest.raises(RdquantError, match="choose one of affine, gguf, gguf:Q2_K"):
        from_settings({}, {"grid": "gguf:Q4_K_M"})
    assert from_settings({}, {"grid": "gguf:Q3_K", "clip_search": 5}).grid == "gguf:Q3_K"
    with pytest.raises(RdquantError, match="cvxq --cells layer solves each linear at one width"):
        from_settings({}, {"method": "cvxq", "cvxq_cells": "layer", "cvxq_solver": "claq", "target_bits": 3.0})
    with pytest.raises(RdquantError, match="--grid gguf solves each layer in its GGUF type"):
        from_settings({}, {"method": "cvxq", "grid": "gguf", "cvxq_solver": "claq", "target_bits": 3.0})
    assert from_settings({}, {"method": "cvxq", "cvxq_cells": "layer", "target_bits": 4.25}).cvxq_cells == "layer"


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    """A tiny llama whose rows are whole super-blocks (hidden 256, MLP 512)."""
    return save_tiny_model_dir(tmp_path_factory.mktemp("wide"), "llama", hidden=256, intermediate=512, layers=2)


@pytest.mark.parametrize("name", ("Q3_K", "Q4_K"))
def test_kquant_artifact_loads_codes_and_exports_to_gguf_exactly(wide_llama, tmp_path, name):
    import gguf
    from transformers import AutoModelForCausalLM

    embed = 16 if name == "Q3_K" else 8  # 8: the vocabulary in symmetric groups of 32, llama.cpp's Q8_0
    cfg = CompressConfig(grid=f"gguf:{name}", calib_samples=4, calib_seqlen=32, embed_bits=embed)
    res = rdquant.compress(str(wide_llama), cfg, progress=False)
    art = res.save(tmp_path / "a")
    coded = res.save(tmp_path / "c", codec="zstd")
    manifest = json.loads((art / "manifest.json").read_text())
    q = manifest["quantized"]["model.layers.0.mlp.down_proj"]
    assert (q["layout"], q["gguf_type"], manifest["format_version"]) == ("kquant", name, 7)
    ref = rdquant.load(art, backend="reference")
    x = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        a = ref(x).logits
        assert torch.equal(rdquant.load(coded, backend="reference")(x).logits, a)
        assert torch.equal(rdquant.load(art, backend="cached")(x).logits, a)
    out = rdquant.export(art, tmp_path / "m.gguf", format="gguf")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert types["blk.1.attn_q.weight"] == name and types["blk.0.ffn_down.weight"] == name
    assert types["token_embd.weight"] == ("F16" if embed == 16 else "Q8_0")
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name)
    with torch.no_grad():
        b = model(x).logits.float()
    assert float((a - b).abs().max()) <= 1e-5 * float(a.abs().max())
    why = f"its llama.cpp {name} grid" if embed == 16 else "it is the quantized embedding"
    with pytest.raises(RdquantError, match=rf"cannot export layer .* to compressed-tensors: {why}"):
        rdquant.export(art, tmp_path / "ct", format="compressed-tensors")


def test_gguf_mix_allocation_fits_and_beats_every_uniform_choice():
    from rdquant.methods import layermix

    g = torch.Generator().manual_seed(0)
    costs = {}
    for i in range(12):
        R = torch.tensor([2.625, 3.4375, 4.5, 5.5, 6.5625, 8.5], dtype=torch.float64) * 1024 * (1 + i % 3)
        D = torch.rand(1, generator=g).double() * 2.0 ** (-2 * R / (1024 * (1 + i % 3)))  # 4x less error per bit
        costs[f"l{i}"] = (layermix.KQUANT_MENU, D, R)
    for budget in (70_000.0, 110_000.0, 180_000.0):
        types, bits = layermix.allocate(costs, budget)
        k = {n: costs[n][0].index(t) for n, t in types.items()}
        assert bits <= budget and bits == sum(float(costs[n][2][k[n]]) for n in costs)
        dist = sum(float(costs[n][1][k[n]]) for n in costs)
        for u in range(6):  # every uniform mix that fits is no better
            if sum(float(c[2][u]) for c in costs.values()) <= budget:
                assert dist <= sum(float(c[1][u]) for c in costs.values()) + 1e-12
    with pytest.raises(RdquantError, match="below the smallest mix"):
        layermix.allocate(costs, 1000.0)


def test_gguf_mix_meets_the_size_target_and_exports_exactly(wide_llama, tmp_path):
    import gguf

    from rdquant.methods import layermix

    sizes = {}
    for target in (420_000, 800_000):
        cfg = CompressConfig(method="cvxq", grid="gguf", target_size=target, calib_samples=4, calib_seqlen=32,
                             cvxq_samples=4, embed_bits=16, clip_search=5)
        art = rdquant.compress(str(wide_llama), cfg, progress=False).save(tmp_path / f"m{target}")
        q = json.loads((art / "manifest.json").read_text())["quantized"]
        linear = sum(layermix.type_bits(e.get("gguf_type") or "Q8_0", *e["shape"]) for e in q.values()) // 8
        assert linear <= target and linear >= 0.9 * target
        out = rdquant.export(art, tmp_path / f"m{target}.gguf", format="gguf")
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
        assert types["blk.0.ffn_down.weight"] == q["model.layers.0.mlp.down_proj"].get("gguf_type", "Q8_0")
        sizes[target] = sum(int(t.n_bytes) for t in gguf.GGUFReader(str(out)).tensors if t.name.startswith("blk.") and
                            not t.name.endswith("norm.weight"))
        assert sizes[target] == linear  # the GGUF file holds the artifact's bytes
    assert sizes[800_000] > sizes[420_000]
    with pytest.raises(RdquantError, match="needs --method cvxq"):
        CompressConfig(grid="gguf")
    with pytest.raises(RdquantError, match="cvxq takes --grid gguf"):
        CompressConfig(method="cvxq", grid="gguf:Q4_K", target_bits=4.0)
    with pytest.raises(RdquantError, match="cannot be met"):
        rdquant.compress(str(wide_llama), CompressConfig(method="cvxq", grid="gguf", target_size=100_000,
                                                         calib_samples=4, calib_seqlen=32), progress=False)


def test_gguf_runs_are_checked_for_export_before_calibration(wide_llama):
    """--export gguf with a k-quant grid or a GGUF mix passes the pre-calibration check (every planned layer has a
    GGUF type); an affine grid with no GGUF type is refused there."""
    from rdquant.export import check_before_compress
    from rdquant.models import load_model

    model = load_model(str(wide_llama))[0]
    check_before_compress("gguf", model, CompressConfig(grid="gguf:Q3_K"))
    check_before_compress("gguf", model, CompressConfig(method="cvxq", grid="gguf", target_size=500_000))
    with pytest.raises(RdquantError, match="to gguf"):
        check_before_compress("gguf", model, CompressConfig(bits=3))
