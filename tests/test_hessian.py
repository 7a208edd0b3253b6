import torch

from rdquant.hessian import HessianAccumulator


def test_panelled_hessian_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, 50, 300, generator=g) for _ in range(4)]
    acc = HessianAccumulator(300)
    for b in batches:
        acc.add(b)
    X = torch.cat([b.reshape(-1, 300) for b in batches]).double()
    ref = 2 * X.T @ X / X.shape[0]
    assert acc.n == X.shape[0]
    assert torch.allclose(acc.H.double(), ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(acc.H, acc.H.T)


def test_hessian_is_mirrored_in_place_exactly():
    """H is the accumulator's storage with the upper triangle mirrored: equal to triu + triu(1)^T of the
    accumulated panels bit for bit (no full-size copy made), and still exact after more batches."""
    torch.manual_seed(0)
    acc = HessianAccumulator(300, panels=4)
    acc.add(torch.randn(64, 300))
    ref = torch.triu(acc._upper) + torch.triu(acc._upper, 1).t()
    H = acc.H
    assert H.data_ptr() == acc._upper.data_ptr() and torch.equal(H, ref) and torch.equal(H, H.t())
    acc.add(torch.randn(32, 300))  # the stale lower triangle plays no part in later batches
    ref = torch.triu(acc._upper) + torch.triu(acc._upper, 1).t()
    assert torch.equal(acc.H, ref)
