"""Rate-distortion allocation: budgets met, optimality against brute force, degenerate cases."""

import itertools

import pytest
import torch

from rdquant.allocate import kappa, waterfill


def _cost(weight, kap, w):
    return float((weight * kap[w]).sum())


def test_waterfill_matches_brute_force_on_small_problems():
    g = torch.Generator().manual_seed(0)
    kap = kappa(4)
    worse = 0
    for trial in range(30):
        n = 4
        weight = torch.rand(n, generator=g, dtype=torch.float64) * 10 + 0.1
        size = torch.randint(1, 5, (n,), generator=g).to(torch.float64)
        rate = size[:, None] * torch.arange(5, dtype=torch.float64)[None, :] + (2.0 ** torch.arange(5)) * 0.5
        budget = float(rate[:, 0].sum() + torch.rand(1, generator=g) * (rate[:, -1] - rate[:, 0]).sum())
        w = waterfill(weight, rate, budget, kap)
        assert float(rate.gather(1, w[:, None]).sum()) <= budget + 1e-9
        best = min(
            (_cost(weight, kap, torch.tensor(c)) for c in itertools.product(range(5), repeat=n)
             if float(rate.gather(1, torch.tensor(c)[:, None]).sum()) <= budget),
        )
        got = _cost(weight, kap, w)
        assert got >= best - 1e-9
        worse += got > best * 1.05 + 1e-12
    # Lagrangian + greedy fill is optimal up to the integer duality gap: rarely more than 5% off
    assert worse <= 3


def test_equal_cells_get_uniform_widths_and_integer_targets_are_exact():
    n = 64
    rate = 100.0 * torch.arange(9, dtype=torch.float64)[None, :].expand(n, 9)
    for b in (2, 3, 4):
        w = waterfill(torch.ones(n, dtype=torch.float64), rate, budget=100.0 * b * n)
        assert torch.equal(w, torch.full((n,), b))


def test_fractional_target_within_one_cell_and_sensitive_cells_get_more():
    g = torch.Generator().manual_seed(1)
    n = 200
    weight = torch.rand(n, generator=g, dtype=torch.float64) ** 4 * 100
    rate = 576.0 * torch.arange(9, dtype=torch.float64)[None, :].expand(n, 9)
    budget = 576.0 * 3.1 * n
    w = waterfill(weight, rate, budget)
    spent = float(rate.gather(1, w[:, None]).sum())
    assert budget - 576 < spent <= budget
    order = torch.argsort(weight)
    assert w[order[-20:]].float().mean() > w[order[:20]].float().mean()
    # high-rate closed form: widths differ by about 1/2 log2 of the weight ratio
    hi, lo = int(order[-1]), int(order[n // 2])
    assert abs((w[hi] - w[lo]).item() - 0.5 * torch.log2(weight[hi] / weight[lo]).item()) <= 1.5


def test_budget_below_minimum_is_refused():
    with pytest.raises(ValueError):
        waterfill(torch.ones(3), torch.ones(3, 5) * 10, budget=5.0)


def _cells(n: int, seed: int = 0):
    """Uniform-grid cells of mixed sizes plus two wide "vocabulary" cells (huge steps: large leftovers)."""
    from rdquant.methods.cvxq import group_rates
    from rdquant.qmixed import width_bits

    g = torch.Generator().manual_seed(seed)
    weight = torch.rand(n, generator=g, dtype=torch.float64) ** 3 * 100 + 1e-3
    sizes = torch.tensor([64.0, 48.0, 128.0], dtype=torch.float64)[torch.randint(0, 3, (n,), generator=g)]
    sizes[-2:] = 5e5
    weight[-2:] = torch.tensor([5e5 * 30, 5e5 * 31], dtype=torch.float64)
    return weight, group_rates(sizes, 7, width_bits(7)).to(torch.float32)


@pytest.mark.parametrize("bits", [2.3, 3.0, 4.25])
def test_chunked_passes_take_the_same_cells_as_one_sort(bits, monkeypatch):
    """Past _CHUNK candidates the greedy fill and the narrowing cut their prefix at a key found by bisection
    (one chunk in memory at a time): the same widths as sorting every candidate at once."""
    from rdquant import allocate as alloc

    weight, rate = _cells(20000)
    budget = bits * float(rate[:, 1].sub(rate[:, 0]).sum())
    one = alloc.Cells(weight, rate)
    w_one = one.waterfill(budget)
    start = w_one.clone()
    start[::3] = 6
    narrowed_one = one.narrow(start, 5e5, 19998, 2)
    monkeypatch.setattr(alloc, "_CHUNK", 1000)
    many = alloc.Cells(weight, rate)
    assert torch.equal(many.waterfill(budget), w_one)
    assert torch.equal(many.narrow(start, 5e5, 19998, 2), narrowed_one)
    assert many.total(w_one) <= budget and many.total(narrowed_one) <= many.total(start) - 5e5


def test_allocation_holds_a_few_bytes_a_cell_whatever_the_count(monkeypatch):
    """The allocation's working memory: weights, per-bit steps and uint8 widths (13 bytes a cell) and one
    chunk's temporaries, not [cells, widths] tables nor [cells]-long int64 and float64 temporaries (an 8B
    model has 54M cells; the whole-array passes took 6.4 GiB of GPU memory there)."""
    from rdquant import allocate as alloc
    from rdquant.testing import LiveBytes

    monkeypatch.setattr(alloc, "_CHUNK", 1 << 13)
    n = 200_000
    weight, rate = _cells(n)
    with LiveBytes() as live:
        weight.view_as(weight), rate.view_as(rate)  # the inputs count from here: what is measured is above them
        base = live.live
        w = alloc.Cells(weight, rate).waterfill(3.1 * float(rate[:, 1].sub(rate[:, 0]).sum()))
        peak = live.peak - base
    assert w.dtype == torch.uint8
    assert peak < 16 * n, f"{peak / n:.1f} bytes a cell"


@pytest.mark.parametrize("bits", [2.3, 3.0, 4.25, 5.0])
def test_chunked_passes_with_keys_of_both_signs(bits, monkeypatch):
    """A distortion model that rises somewhere (a measured kappa need not fall everywhere) gives steps of
    negative gain: the cut falls back to a bisection over the keys and still equals one sort."""
    from rdquant import allocate as alloc

    weight, rate = _cells(20000, seed=1)
    kap = kappa(7).clone()
    kap[5] = kap[4] * 1.5
    budget = bits * float(rate[:, 1].sub(rate[:, 0]).sum())
    one = alloc.Cells(weight, rate, kap)
    w_one = one.waterfill(budget)
    monkeypatch.setattr(alloc, "_CHUNK", 1000)
    assert torch.equal(alloc.Cells(weight, rate, kap).waterfill(budget), w_one)


def test_allocation_of_a_whole_model_holds_a_few_bytes_a_cell_on_the_device(monkeypatch):
    """cvxq.allocate on the default model's cell count (bench/alloc_memory.py, 30 blocks, 887k cells): from
    allocate.Cells on, its arrays, float64 weights and passes take ~20 bytes a cell with small chunks, not
    the [cells, widths] tables and [cells]-long passes it moved to the GPU before (6.4 GiB at 8B)."""
    import sys
    from pathlib import Path

    from rdquant import allocate as alloc

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from alloc_memory import measure

    monkeypatch.setattr(alloc, "_CHUNK", 1 << 15)
    r = measure("135m", 30, 3.0)
    assert r["bytes_per_cell"] < 24, r
    assert r["bits_per_weight"] <= 3.0
