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
