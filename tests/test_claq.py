"""CLAQ: batched 1-D K-means, column codebooks in the GPTQ sweep, the column policy, the codebook
layout (mixed-width packing, outliers) and save -> load on tiny models."""

import numpy as np
import pytest
import torch

import rdquant
from rdquant.config import CompressConfig
from rdquant.errors import RdquantError
from rdquant.kmeans import distortion, ec_refine, kmeans_1d, nearest, rate_assign
from rdquant.methods.claq import claq_quantize, layer_bits, plan_columns
from rdquant.methods.gptq import ColumnQuantizer, gptq_sweep, prepare_hessian, proxy_error
from rdquant.models import load_model
from rdquant.qcodebook import CodebookWeight, pack_segments, unpack_segments
from rdquant.runtime import QuantLinear


def optimal_1d(x: np.ndarray, k: int) -> float:
    """Brute-force optimum of 1-D K-means: dynamic programming over contiguous sorted segments."""
    xs = np.sort(x.astype(np.float64))
    n = len(xs)
    c1, c2 = np.concatenate([[0], np.cumsum(xs)]), np.concatenate([[0], np.cumsum(xs**2)])
    i, j = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    cost = (c2[j] - c2[i]) - (c1[j] - c1[i]) ** 2 / np.maximum(j - i, 1)
    cost[j <= i] = np.inf
    best = np.full(n + 1, np.inf)
    best[0] = 0
    for _ in range(k):
        best = np.min(best[:, None] + cost, axis=0)
    return float(best[n])


def test_kmeans_is_near_the_optimal_1d_quantizer():
    """Lloyd-type K-means is a heuristic: on small heavy-tailed sets it stays within a few percent of
    the optimum on average; single sets can stall in a worse local optimum (bounded here)."""
    torch.manual_seed(1)  # StudentT samples from the global generator
    g = torch.Generator().manual_seed(0)
    ratios = []
    for _ in range(40):
        n = int(torch.randint(10, 60, (1,), generator=g))
        k = int(torch.randint(2, 7, (1,), generator=g))
        x = torch.distributions.StudentT(3.0).sample((1, n)) if len(ratios) % 2 else torch.randn(1, n, generator=g)
        got = float(distortion(x, kmeans_1d(x, k, iters=100)))
        ratios.append(got / max(optimal_1d(x[0].numpy(), min(k, n)), 1e-12))
    assert min(ratios) >= 1 - 1e-6  # nothing beats the optimum (checks the brute force too)
    assert np.mean(ratios) < 1.03 and max(ratios) < 1.5, ratios


def test_kmeans_batched_weighted_and_per_row_k():
    torch.manual_seed(0)
    x = torch.randn(5, 40)
    w = (torch.rand(5, 40) > 0.3).float()
    k = torch.tensor([1, 2, 3, 4, 8])
    c = kmeans_1d(x, k, w)
    assert c.shape == (5, 8)
    for r in range(5):  # rows are independent, weight-0 values are ignored, slots past k are inf
        sub = x[r][w[r] > 0][None]
        alone = kmeans_1d(sub, int(k[r]))
        torch.testing.assert_close(c[r, : k[r]], alone[0, : k[r]])
        assert torch.isinf(c[r, k[r] :]).all()
        assert int(nearest(x[r : r + 1], c[r : r + 1]).max()) < k[r]
    assert torch.equal(kmeans_1d(x, k, w), c)  # deterministic


class _UniformColumn(ColumnQuantizer):
    """Reference: each column on the uniform min-max grid of the same width (no codebook fitting)."""

    def __init__(self, bits):
        self.k = 1 << bits

    def begin_block(self, cols, W1):
        pass

    def column(self, i, w):
        lv = torch.linspace(float(w.min()), float(w.max()), self.k).to(torch.float16).float()[None]
        return lv[0][nearest(w[None], lv)[0]]


@pytest.mark.parametrize("bits", [2, 3])
def test_codebooks_never_lose_to_the_uniform_grid_of_the_same_width(bits):
    g = torch.Generator().manual_seed(bits)
    W = torch.distributions.StudentT(2.5).sample((128, 96)) * 0.02
    X = torch.randn(96, 512, generator=g) * torch.rand(96, 1, generator=g) * 3
    H = 2 * X @ X.t() / X.shape[1]
    cfg = CompressConfig(method="claq", bits=bits)
    (cw,), _ = claq_quantize(W, H, cfg)
    notes = []
    W0, H0, _ = prepare_hessian(W, H, notes)
    Q = W0.clone()

    class Rec(_UniformColumn):
        def begin_block(self, cols, W1):
            self.cols = cols

        def column(self, i, w):
            q = super().column(i, w)
            Q[:, self.cols[i]] = q
            return q

    perm = torch.argsort(torch.diagonal(H0), descending=True)
    assert gptq_sweep(W0.clone(), H0, Rec(bits), perm, cfg.block_size, cfg.damp_percent, notes)
    assert proxy_error(W, cw.dequantize(), H) <= proxy_error(W, Q, H)


def test_mixed_width_packing_round_trips():
    g = torch.Generator().manual_seed(1)
    widths = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 3, 3])
    cw = widths.repeat_interleave(3)[:31]
    codes = (torch.rand(13, 31, generator=g) * (1 << cw)[None, :]).floor().to(torch.uint8)
    packed = pack_segments(codes, cw)
    assert packed.numel() == sum(-(-13 * int((cw == b).sum()) // 8) * b for b in range(1, 9))
    assert torch.equal(unpack_segments(packed, cw, 13), codes)
    book = torch.randn(int((1 << widths).sum())).half()
    w = CodebookWeight(codes, widths.to(torch.uint8), book, share=3)
    back = CodebookWeight.from_packed(w.packed_state(), (13, 31), 3)
    assert torch.equal(back.dequantize(), w.dequantize())
    with pytest.raises(ValueError):
        unpack_segments(packed[:-1], cw, 13)


def test_outlier_reservation_count_and_storage_are_exact():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(200, 64, generator=g) * 0.02
    W[torch.randint(0, 200, (30,), generator=g), torch.randint(0, 64, (30,), generator=g)] = 0.5
    X = torch.randn(64, 256, generator=g)
    H = 2 * X @ X.t() / 256
    cfg = CompressConfig(method="claq", bits=3, claq_outlier_frac=0.01)
    plan = plan_columns(W, torch.diagonal(H), cfg)
    # CLAQ's rule: the top 10% of columns keep 3.5x the share of the others; mean share as configured
    base = 0.01 / (0.1 * 3.5 + 0.9)
    expect = sorted([round(base * 3.5 * 200)] * 6 + [round(base * 200)] * 58)
    assert sorted(plan.outliers.tolist()) == expect
    (cw,), _ = claq_quantize(W, H, cfg)
    assert torch.equal(cw.outlier_count.long(), plan.outliers)
    st = cw.packed_state()
    assert st["outlier_count"].numel() * 2 + st["outlier_row"].numel() * 2 + st["outlier_val"].numel() * 2 == \
        64 * 2 + sum(expect) * 4
    # the kept entries are the column's largest and smallest values, stored exactly in fp16
    Q = cw.dequantize()
    cols = cw.outlier_cols()
    assert torch.equal(Q[cw.outlier_row.long(), cols], cw.outlier_val.float())
    big = Q[cw.outlier_row.long(), cols].abs().max()
    assert big >= 0.4  # the planted 0.5s are among them
    nbytes = sum(v.numel() * v.element_size() for v in st.values())
    assert 8 * nbytes == layer_bits(200, 64, 1, plan.widths, plan.outliers, 1, False, cfg.claq_codebook_bits)


@pytest.mark.parametrize("target", [2.2, 3.1, 4.1])
def test_plan_meets_the_all_in_target_and_promotes_outlier_columns(target):
    g = torch.Generator().manual_seed(3)
    W = torch.randn(576, 192, generator=g) * 0.02
    W[:, 7] *= 40  # a column full of outliers
    h = torch.rand(192, generator=g) + 0.5
    cfg = CompressConfig(method="claq", target_bits=target, claq_outlier_frac=0.002, claq_policy="outlier")
    plan = plan_columns(W, h, cfg)
    bits = plan.bits(576, 192, cfg)
    assert bits <= target * W.numel()
    assert bits > (target - 0.05) * W.numel()  # and uses the budget
    assert int(plan.widths[7]) == int(plan.widths.max())
    assert len(set(plan.widths.tolist())) <= 2


def test_plan_rejects_an_impossible_target():
    cfg = CompressConfig(method="claq", target_bits=0.2)
    with pytest.raises(RdquantError, match="cannot be met"):
        plan_columns(torch.randn(16, 32), torch.ones(32), cfg)


def test_config_validation_for_claq():
    with pytest.raises(RdquantError):
        CompressConfig(method="gptq", target_bits=3.0)
    with pytest.raises(RdquantError):
        CompressConfig(method="claq", claq_outlier_frac=0.6)
    with pytest.raises(RdquantError):
        CompressConfig(method="claq", claq_share=0)
    with pytest.raises(RdquantError, match="entropy-lambda"):
        CompressConfig(method="claq", claq_entropy_lambda=-0.1)


def _entropy(codes: torch.Tensor) -> float:
    p = torch.bincount(codes.reshape(-1).long()).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log2()).sum())


def test_entropy_constrained_kmeans_trades_distortion_for_rate():
    """mu = 0 is nearest-centroid; a larger lambda gives codes of lower entropy at more distortion,
    and the centroids stay ascending (what the codebook layout needs)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 400, generator=g)
    w = torch.rand(6, 400, generator=g) + 0.5
    c = kmeans_1d(x, 8, w)
    zero = torch.zeros(6)
    assert torch.equal(rate_assign(x, c, w, zero, torch.rand(6, 8, generator=g)), nearest(x, c))
    count = torch.ones_like(x, dtype=torch.bool)
    rows = 8 * torch.arange(6)[:, None]  # mean per-row entropy (rows of equal size)
    h0, d0 = _entropy(nearest(x, c) + rows) - np.log2(6), float(distortion(x, c, w).sum())
    last_h = h0
    for lam in (0.3, 1.0, 3.0):
        cb, bits, mu = ec_refine(x, c, w, count, lam)
        assert bool((cb[:, 1:] >= cb[:, :-1]).all()) and bits.shape == (6, 8) and bool((mu > 0).all())
        code = rate_assign(x, cb, w, mu, bits)
        h = _entropy(code + rows) - np.log2(6)
        d = float((w * (x - cb.gather(1, code)).square()).sum())
        assert h < last_h, (lam, h, last_h)
        last_h = h
    assert h < h0 - 0.3 and d > 1.2 * d0, (h, h0, d, d0)  # lambda 3: far fewer bits, clearly more error


def test_claq_entropy_lambda_lowers_the_code_entropy_at_a_small_error_cost():
    torch.manual_seed(1)  # StudentT samples from the global generator
    g = torch.Generator().manual_seed(1)
    W = torch.distributions.StudentT(4.0).sample((192, 128)) * 0.02
    X = torch.randn(128, 512, generator=g) * torch.rand(128, 1, generator=g) * 3
    H = 2 * X @ X.t() / X.shape[1]
    out = {}
    for lam in (0.0, 0.7):
        (cw,), _ = claq_quantize(W, H, CompressConfig(method="claq", bits=3, claq_entropy_lambda=lam))
        out[lam] = (_entropy(cw.codes), proxy_error(W, cw.dequantize(), H))
    (h0, e0), (h1, e1) = out[0.0], out[0.7]
    assert h1 < h0 - 0.02 and e1 < 1.15 * e0, out


@pytest.mark.parametrize("extra", [dict(target_bits=3.6, claq_outlier_frac=0.01),
                                   dict(bits=2, claq_share=4, claq_scale_group=24, claq_codebook_bits=16)])
def test_claq_save_load_is_bit_exact(tiny_model_dir, tmp_path, extra):
    model, tok, mid = load_model(str(tiny_model_dir))
    cfg = CompressConfig(method="claq", calib_samples=8, calib_seqlen=64, batch_size=4, **extra)
    cm = rdquant.compress(model, cfg, tokenizer=tok, progress=False, model_id=mid)
    out = cm.save(tmp_path / "a")
    x = torch.arange(40).unsqueeze(0)
    for lazy in (False, True):
        loaded = rdquant.load(out, lazy=lazy)
        for n, m in cm.model.named_modules():
            if isinstance(m, QuantLinear):
                assert m.layout.name == ("codebook" if m.kind == "linear" else "affine")
                assert torch.equal(m.dequantized_weight(), loaded.get_submodule(n).dequantized_weight()), n
        with torch.no_grad():
            assert torch.equal(cm.model(x).logits, loaded(x).logits)
    rep = rdquant.inspect(out)
    split = rep.split_bits()
    assert abs(sum(split.values()) - rep.bits_per_weight) < 1e-9
    assert split["codebooks"] > 0 and (split["outliers"] > 0) == ("claq_outlier_frac" in extra)
    if "target_bits" in extra:
        assert rep.bits_per_weight <= extra["target_bits"]
    coded = rdquant.coding.recode(out, tmp_path / "c", codec="ans")
    with torch.no_grad():
        assert torch.equal(rdquant.load(coded)(x).logits, cm.model(x).logits)
    assert rdquant.inspect(coded).quantized_stored_bytes < rep.quantized_bytes


def test_rd_policy_meets_the_target_and_favours_sensitive_columns():
    g = torch.Generator().manual_seed(4)
    W = torch.randn(576, 192, generator=g) * 0.02
    h = torch.ones(192)
    h[:16] = 50.0  # inputs that matter far more
    cfg = CompressConfig(method="claq", target_bits=3.1, claq_policy="rd")
    plan = plan_columns(W, h, cfg)
    bits = plan.bits(576, 192, cfg)
    assert (3.1 - 0.05) * W.numel() < bits <= 3.1 * W.numel()
    assert plan.widths[:16].float().mean() >= plan.widths[16:].float().mean() + 1.5  # ~1/2 log2(50) = 2.8 more


def test_row_scales_per_column_group_round_trip():
    g = torch.Generator().manual_seed(5)
    W = torch.randn(40, 100, generator=g) * torch.rand(40, 1, generator=g)
    X = torch.randn(100, 256, generator=g)
    H = 2 * X @ X.t() / 256
    cfg = CompressConfig(method="claq", bits=3, claq_scale_group=32)
    (cw,), _ = claq_quantize(W, H, cfg)
    assert tuple(cw.row_scale.shape) == (40, 4)  # ragged last group of 4 columns
    back = CodebookWeight.from_packed(cw.packed_state(), (40, 100), 1, 32)
    assert torch.equal(back.dequantize(), cw.dequantize())


@pytest.mark.parametrize("shape", [(7, 50, 4), (5, 300, 16), (3, 129, 8)])
def test_fused_lloyd_kernel_gives_the_torch_steps_centroids(monkeypatch, shape):
    """kernels/kmeans_triton.py (GPUs; the interpreter here) runs kmeans_1d's Lloyd steps in one kernel:
    same centroids, per-row k, zero weights and the split-merge moves included."""
    pytest.importorskip("triton")
    import rdquant.kmeans as K

    B, n, k = shape
    g = torch.Generator().manual_seed(n)
    x = torch.randn(B, n, generator=g) ** 3
    w = torch.rand(B, n, generator=g)
    w[0, :10] = 0
    kk = torch.randint(1, k + 1, (B,), generator=g)
    out = []
    for fused in (False, True):
        monkeypatch.setattr(K, "FUSED_LLOYD", fused)
        out.append(K.kmeans_1d(x, kk, w, iters=20, rounds=1))
    assert torch.equal(out[0], out[1])


def test_outlier_mask_keeps_the_largest_and_smallest_valid_entries():
    from rdquant.methods.claq import _outlier_mask

    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        N, m = 9, int(torch.randint(1, 40, (1,), generator=g))
        X = torch.randn(N, m, generator=g)
        valid = torch.rand(N, m, generator=g) > 0.2
        n_top, n_bot = torch.randint(0, m + 2, (N,), generator=g), torch.randint(0, m + 2, (N,), generator=g)
        got = _outlier_mask(X, valid, n_top, n_bot)
        for r in range(N):
            vals = sorted((float(X[r, j]), j) for j in range(m) if valid[r, j])
            want = {j for _, j in vals[: int(n_bot[r])]} | {j for _, j in vals[max(len(vals) - int(n_top[r]), 0):]}
            assert set(torch.nonzero(got[r]).flatten().tolist()) == want
