"""The fused lazy-block GPTQ kernel (Triton; the CPU interpreter here) chooses the Python loop's codes."""

import pytest
import torch

from rdquant.config import CompressConfig
from rdquant.methods import gptq as G
from rdquant.methods.gptq import proxy_error

pytest.importorskip("triton")


def _problem(rows=40, cols=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(500, cols, generator=g) * torch.rand(cols, generator=g) * 3
    return W, 2 * X.t() @ X / 500


def _both(monkeypatch, fn):
    real = G._block_kernel
    out = []
    for forced in (False, True):
        monkeypatch.setattr(G, "_block_kernel", lambda W, kernel, f=forced: real(W, f))
        out.append(fn())
    return out


@pytest.mark.parametrize("kw", [dict(bits=3, group_size=64), dict(bits=4, group_size=64, symmetric=True),
                                dict(bits=2, group_size=-1), dict(bits=3, group_size=48, act_order=True)])
def test_fused_block_matches_the_python_loop(monkeypatch, kw):
    W, H = _problem()
    a, b = _both(monkeypatch, lambda: G.gptq_quantize(W, H, CompressConfig(**kw))[0])
    assert torch.equal(a.codes, b.codes)
    assert torch.equal(a.scales, b.scales)


def test_fused_block_on_mixed_width_cluster_cells(monkeypatch):
    """CVXQ's row-cluster x column cells (widths 0..4 per cell) through the same kernel."""
    W, H = _problem(rows=48, cols=160, seed=1)
    g = torch.Generator().manual_seed(2)
    clusters = torch.randint(0, 3, (48,), generator=g)
    widths = torch.randint(0, 5, (3, 160), generator=g)
    cfg = CompressConfig(method="cvxq", target_bits=3.0)
    a, b = _both(monkeypatch, lambda: G.gptq_quantize(W, H, cfg, widths=widths, max_width=4, clusters=clusters)[0])
    assert torch.equal(a.codes, b.codes)
    # and the dynamic (non-static) grid keeps the Python loop: no affine_block before the block starts
    uq = G._UniformColumns(CompressConfig(act_order=False), torch.zeros(4, 1), torch.zeros(4, 1), False,
                           torch.ones(8), 4, 8)
    assert uq.affine_block() is None


@pytest.mark.parametrize("bits,symmetric,per_row_weight", [(3, False, False), (4, True, False), ("mixed", False, True)])
def test_batched_clip_search_picks_the_loops_grid(monkeypatch, bits, symmetric, per_row_weight):
    """The GPU's all-candidates-at-once clip search (grid._batched_clip_search) chooses what the loop does."""
    from rdquant import grid

    g = torch.Generator().manual_seed(0)
    w = torch.randn(3000, 64, generator=g) * 0.02
    b = torch.randint(1, 6, (3000, 1), generator=g) if bits == "mixed" else bits
    cw = torch.rand(3000 if per_row_weight else 1, 64, generator=g)
    monkeypatch.setattr(grid, "_SEARCH_ELEMENTS", 50_000)  # several row chunks
    out = []
    for batched in (False, True):
        monkeypatch.setattr(grid, "_BATCHED_SEARCH", batched)
        out.append(grid.grid_params(w, b, symmetric, 20, 0.3, cw, 7))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


def _claq(monkeypatch, W, H, parts=None, **kw):
    from rdquant.methods.claq import claq_quantize

    cfg = CompressConfig(method="claq", **kw)
    return _both(monkeypatch, lambda: claq_quantize(W, H, cfg, parts)[0])


@pytest.mark.parametrize("kw", [dict(bits=3, claq_refine_iters=0), dict(target_bits=2.6, claq_refine_iters=0),
                                dict(bits=3, claq_share=8), dict(bits=3, claq_codebook_bits=16, claq_refine_iters=0,
                                                                 claq_scale_group=64)])
def test_fused_codebook_block_matches_the_python_loop(monkeypatch, kw):
    """With codebooks fixed when the block starts (no per-column refinement), the kernel codes what the
    loop codes, stacked parts (q, k, v style) and mixed widths included: up to float rounding of the
    error feedback, which moves later blocks' K-means centroids in their last bits."""
    W, H = _problem(rows=72, cols=200)
    loop, fused = _claq(monkeypatch, W, H, parts=((40, False), (32, False)), **kw)
    for (a, b), rows in zip(zip(loop, fused), ((0, 40), (40, 72))):
        assert (a.codes == b.codes).float().mean() > 0.999
        assert torch.equal(a.widths, b.widths)
        Wp, Ha = W[rows[0]:rows[1]], H
        ea, eb = proxy_error(Wp, a.dequantize(), Ha), proxy_error(Wp, b.dequantize(), Ha)
        assert abs(ea - eb) <= 1e-3 * ea, (ea, eb)


def test_fused_codebook_block_refines_and_reserves_outliers(monkeypatch):
    """The default per-column refinement runs batched between two passes: the layer error stays that of
    the loop's (within 3%), and the fp16 outliers keep their exact count per column."""
    W, H = _problem(rows=96, cols=256, seed=3)
    W[5, 7] = W[60, 100] = 9.0
    kw = dict(target_bits=3.1, claq_outlier_frac=0.02)
    loop, fused = _claq(monkeypatch, W, H, **kw)
    (a,), (b,) = loop, fused
    assert torch.equal(a.outlier_count, b.outlier_count)
    ea, eb = proxy_error(W, a.dequantize(), H), proxy_error(W, b.dequantize(), H)
    assert eb < 1.03 * ea, (ea, eb)
    kept = set(zip(b.outlier_row.tolist(), b.outlier_cols().tolist()))
    assert {(5, 7), (60, 100)} <= kept
