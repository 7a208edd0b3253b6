"""GPTQ against a float64 reference, against RTN, and on awkward inputs."""

import pytest
import torch

from rdquant.config import CompressConfig
from rdquant.grid import grid_params, group_grid, quantize, store_scale
from rdquant.methods.gptq import gptq_quantize, proxy_error
from rdquant.methods.rtn import rtn_quantize
from rdquant.qtensor import dequantize_codes, expand_groups


def correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    scale = torch.logspace(-1, 1, d)  # very different input magnitudes
    return (torch.randn(n, d, generator=g) @ mix) * scale


def hessian(X: torch.Tensor) -> torch.Tensor:
    return 2 * X.T @ X / X.shape[0]


def reference_gptq(W, H, cfg):
    """Textbook OBQ/GPTQ recursion in float64, one column at a time, natural order, no blocking:
    quantize column j, spread its error with the j-th row of the inverse Hessian, then remove j
    from the inverse (Gaussian elimination). Groups' grids are set on the updated weights."""
    W = W.double().clone()
    H = H.double().clone()
    cols = W.shape[1]
    H += cfg.damp_percent * torch.diagonal(H).mean() * torch.eye(cols, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    G = cfg.group_size
    Q = torch.zeros_like(W)
    for j in range(cols):
        if j % G == 0:
            s, z = grid_params(W[:, j : j + G].float(), cfg.bits, cfg.symmetric)
        c = quantize(W[:, j : j + 1].float(), s, z, cfg.bits)
        Q[:, j] = dequantize_codes(c, s, z)[:, 0].double()
        err = (W[:, j] - Q[:, j]) / Hinv[j, j]
        W[:, j:] -= torch.outer(err, Hinv[j, j:])
        Hinv -= torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    return Q


def test_gptq_matches_float64_reference():
    torch.manual_seed(0)
    X = correlated_inputs(2048, 96)
    H = hessian(X)
    W = torch.randn(24, 96)
    cfg = CompressConfig(bits=3, group_size=32, act_order=False, clip_search=0, block_size=64,
                         scale_bits=10)  # the reference keeps full fp16 scales
    qw, notes = gptq_quantize(W, H, cfg)
    Q = qw.dequantize()
    Qref = reference_gptq(W, H, cfg).float()
    agree = (Q == Qref).float().mean().item()
    assert agree > 0.97, f"only {agree:.3f} of entries agree with the float64 reference"
    e, eref = proxy_error(W, Q, H), proxy_error(W, Qref, H)
    assert abs(e - eref) / eref < 0.02


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(bits, act_order):
    X = correlated_inputs(4096, 128, seed=bits)
    H = hessian(X)
    W = torch.randn(64, 128)
    cfg = CompressConfig(bits=bits, group_size=64, act_order=act_order, clip_search=0)
    qg, _ = gptq_quantize(W, H, cfg)
    qr = rtn_quantize(W, cfg)
    assert proxy_error(W, qg.dequantize(), H) < 0.95 * proxy_error(W, qr.dequantize(), H)


def test_ragged_last_group_and_per_channel():
    X = correlated_inputs(1024, 100)
    H = hessian(X)
    W = torch.randn(16, 100)
    for gs in (64, 48, -1):
        cfg = CompressConfig(bits=4, group_size=gs, clip_search=5)
        qw, _ = gptq_quantize(W, H, cfg)
        assert qw.scales.shape == (16, 1 if gs == -1 else -(-100 // gs))
        assert qw.codes.shape == (16, 100) and int(qw.codes.max()) < 16
        assert (qw.dequantize() - W).abs().max() < W.abs().max()


def test_dead_inputs_get_zero_weight_and_all_dead_falls_back_to_rtn():
    X = correlated_inputs(512, 64)
    X[:, 5] = 0
    H = hessian(X)
    W = torch.randn(8, 64)
    cfg = CompressConfig(bits=4, group_size=32)
    qw, notes = gptq_quantize(W, H, cfg)
    assert torch.all(qw.dequantize()[:, 5] == 0)
    assert any("dead" in n for n in notes)
    qw, notes = gptq_quantize(W, torch.zeros(64, 64), cfg)
    assert any("RTN" in n for n in notes)
    assert torch.equal(qw.codes, rtn_quantize(W, cfg).codes)


@pytest.mark.parametrize("n", [64, 500])
def test_inverse_factor_is_the_upper_factorisation_bit_for_bit(n):
    """The in-place factor equals torch.linalg.cholesky(upper=True) of the inverse exactly (the transpose of the
    lower factor differs in the last bits, which moves GPTQ's rounding choices), upper triangular."""
    from rdquant.methods.gptq import inverse_hessian_cholesky

    X = torch.randn(n, 2 * n)
    H = X @ X.T / (2 * n)
    Hd = H.clone()
    Hd.diagonal().add_(0.01 * float(torch.diagonal(H).to(torch.float64).mean()))
    want = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True)
    U = inverse_hessian_cholesky(H, 0.01, [])
    assert torch.equal(U, want) and torch.equal(U, U.triu())


def test_non_positive_definite_hessian_gets_more_damping():
    """Damping grows tenfold until the Cholesky succeeds, also when the mean diagonal is negative."""
    from rdquant.methods.gptq import inverse_hessian_cholesky

    H = -torch.eye(32, dtype=torch.float64)  # -I + d I factors only once d > 1: 0.01, 0.1, 1 fail, 10 works
    notes: list[str] = []
    U = inverse_hessian_cholesky(H, 0.01, notes)
    assert U is not None and notes == ["Hessian not positive definite: damping raised to 10"]
    assert torch.allclose(U.T @ U, torch.linalg.inv(H + 10 * torch.eye(32, dtype=torch.float64)))
    X = torch.randn(32, 4, dtype=torch.float64)
    H = X @ X.T - 0.5 * torch.eye(32, dtype=torch.float64)  # rank 4 minus a bit: indefinite, mean diag > 0
    notes = []
    assert inverse_hessian_cholesky(H, 0.01, notes) is not None and "damping raised" in notes[0]
    notes = []
    assert inverse_hessian_cholesky(torch.eye(8, dtype=torch.float64), 0.01, notes) is not None and notes == []
    assert inverse_hessian_cholesky(H, 0.01, [], tries=1) is None  # no retry: fails
    W = torch.randn(8, 32)
    qw, notes = gptq_quantize(W, -torch.eye(32), CompressConfig(bits=4, group_size=32, act_order=False))
    assert any("damping raised" in n for n in notes) and torch.isfinite(qw.dequantize()).all()


def test_nan_hessian_is_an_error():
    H = torch.eye(16)
    H[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        gptq_quantize(torch.randn(4, 16), H, CompressConfig(bits=4, group_size=16))


def test_clip_search_never_worse_than_minmax():
    W = torch.randn(32, 64) ** 3  # heavy tails
    base = rtn_quantize(W, CompressConfig(bits=3, group_size=32, clip_search=0))
    clip = rtn_quantize(W, CompressConfig(bits=3, group_size=32, clip_search=20))
    err = lambda q: (q.dequantize() - W).square().sum(1)
    assert torch.all(err(clip) <= err(base) + 1e-6)


def test_group_grid_matches_per_group_grid():
    W = torch.randn(6, 100)
    s, z = group_grid(W, 3, False, 32, clip_search=4)
    for k in range(4):
        s1, z1 = grid_params(W[:, k * 32 : (k + 1) * 32], 3, False, clip_search=4)
        assert torch.equal(s[:, k : k + 1], s1) and torch.equal(z[:, k : k + 1], z1)
    S = expand_groups(s, 100, 32)
    assert S.shape == (6, 100) and torch.equal(S[:, 99], s[:, 3])


@pytest.mark.parametrize("mantissa", [10, 7, 4])
def test_store_scale_keeps_the_asked_mantissa_bits(mantissa):
    x = torch.rand(5000, generator=torch.Generator().manual_seed(0)) * 3 + 1e-3
    s = store_scale(x, mantissa)
    assert torch.equal(s, s.to(torch.float16).float())  # an fp16 value
    assert float(((s - x) / x).abs().max()) <= 2.0 ** -(mantissa + 1)
    low = s.to(torch.float16).view(torch.int16) & ((1 << (10 - mantissa)) - 1)
    assert not low.any()
    assert torch.equal(store_scale(x), x.to(torch.float16).float())  # the default is plain fp16
    with pytest.raises(ValueError):
        store_scale(x, 0)


def test_gptq_scale_bits_zero_the_low_mantissa_bits_and_cost_little():
    g = torch.Generator().manual_seed(1)
    X = correlated_inputs(512, 96)
    W = torch.randn(48, 96, generator=g)
    H = hessian(X)
    err = {}
    for m in (10, 5):
        qw, _ = gptq_quantize(W, H, CompressConfig(bits=3, group_size=32, scale_bits=m))
        bits = qw.scales.view(torch.int16) & 31
        assert bool(bits.any()) == (m == 10)
        err[m] = proxy_error(W, qw.dequantize(), H)
    assert err[5] < 1.1 * err[10]
    with pytest.raises(Exception, match="scale-bits"):
        CompressConfig(scale_bits=11)


def test_inverse_hessian_of_the_permuted_matrix_matches_the_copy():
    """perm= factors H in that order from one scratch copy per attempt: the factor of H[perm][:, perm],
    bit for bit, retries included, and H itself is left as it was."""
    from rdquant.methods.gptq import inverse_hessian_cholesky

    X = torch.randn(48, 40)
    perm = torch.randperm(40)
    for H in (X.T @ X / 48, X[:4].T @ X[:4] - 0.5 * torch.eye(40)):  # positive definite; needs more damping
        before, a_notes, b_notes = H.clone(), [], []
        a = inverse_hessian_cholesky(H[perm][:, perm], 0.01, a_notes)
        b = inverse_hessian_cholesky(H, 0.01, b_notes, perm=perm)
        assert torch.equal(a, b) and a_notes == b_notes and torch.equal(H, before)
    assert "damping raised" in b_notes[0]


def test_gptq_solve_peak_memory_stays_near_three_hessians():
    """One stage's solve (quantize_stage on a down_proj-shaped layer) holds at most H, the in-place factor
    and a few weight copies at once: 6.97 Hessians before the copies were cut, 4.22 with a separate
    factor, inverse and factor again, 2.95 now (bench/solve_memory.py). CLAQ's sweep shares the solve."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from solve_memory import measure

    for method, most in (("gptq", 3.2), ("claq", 4.5)):  # CLAQ's K-means temporaries weigh more at this size
        r = measure(method, 256, 896)
        assert r["peak_in_hessians"] <= most, r
