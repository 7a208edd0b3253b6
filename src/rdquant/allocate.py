"""Rate-distortion bit allocation (reverse water-filling, as in CVXQ; Young 2024, arXiv 2409.02026).

Cells (columns, column groups, ...) get integer widths b in 0..B. Cell i's distortion at width b is
modelled as D_i(b) = weight_i * kappa(b), weight_i = sensitivity x variance x size, and its rate is
whatever the layout stores for it (codes + codebook + ...). One multiplier lambda is shared by all
cells: each takes argmin_b D_i(b) + lambda * R_i(b); lambda is found by bisection so the total rate
meets the budget. With D convex and R convex in b the widths fall as lambda grows, so the bisection
is well posed; for the pure high-rate model (kappa = 2^-2b, R = n b) this is the classic
B_i = 1/2 log2(S_i^2 G_i^2 / lambda') rounded and clamped.
"""

from __future__ import annotations

import math

import torch

# MSE of the optimal (Lloyd-Max) scalar quantizer of a unit-variance Gaussian at 0..4 bits; each
# further bit divides it by 4 (the high-rate slope). Width 0 replaces the cell by its mean.
_LLOYD_MAX_GAUSS = (1.0, 0.3634, 0.1175, 0.03454, 0.009497)


def kappa(max_bits: int = 8) -> torch.Tensor:
    """Distortion per unit variance at widths 0..max_bits (float64)."""
    k = list(_LLOYD_MAX_GAUSS[: max_bits + 1])
    while len(k) < max_bits + 1:
        k.append(k[-1] / 4)
    return torch.tensor(k, dtype=torch.float64)


_CHUNK = 1 << 22  # cells per step of widths_at (bounds its temporary to a few tens of MB)


def widths_at(lam: float, D: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """argmin_b D[i, b] + lam * R[i, b] per cell (ties to the narrower width), in chunks of cells."""
    return torch.cat([torch.argmin(D[a : a + _CHUNK] + lam * R[a : a + _CHUNK], dim=1)
                      for a in range(0, D.shape[0], _CHUNK)])


def affine_steps(rate: torch.Tensor, kap: torch.Tensor) -> torch.Tensor | None:
    """Each cell's rate per extra bit [n] when every cell's rate grows by the same amount at each width step
    (R[i, b] = R[i, 0] + s_i b, s_i > 0) and kap is convex (its drops shrink with the width); else None.
    Such allocations (uniform grids' cells) have a closed-form width at each lambda: no [n, B] tables."""
    if rate.shape[1] < 2:
        return None
    s = rate[:, 1] - rate[:, 0]
    dk = kap[:-1] - kap[1:]
    if not bool((s > 0).all()) or not bool((dk[1:] <= dk[:-1]).all()) or not bool((dk > 0).all()):
        return None
    for b in range(2, rate.shape[1]):
        if not bool((rate[:, b] - rate[:, b - 1] == s).all()):
            return None
    return s


def _affine_widths(lam: float, ratio: torch.Tensor, dk: torch.Tensor) -> torch.Tensor:
    """argmin_b w kap[b] + lam s b (ties to the narrower) for convex kap: a cell takes step b while
    w (kap[b-1] - kap[b]) > lam s, i.e. while ratio = w / s exceeds lam / dk[b-1] (a prefix of the steps)."""
    return torch.searchsorted(lam / dk, ratio)  # thresholds ascending (dk falls): how many lie below ratio


def waterfill(weight: torch.Tensor, rate: torch.Tensor, budget: float, kap: torch.Tensor | None = None,
              iters: int = 100, device: str | torch.device | None = None, keep_device: bool = False) -> torch.Tensor:
    """Widths [n] (long) minimising sum_i weight_i * kap[b_i] subject to sum_i rate[i, b_i] <= budget.

    rate: [n, B+1] bits of cell i at each width (non-decreasing in b). Raises ValueError when even
    the narrowest widths exceed the budget. The result is the Lagrangian solution for the smallest
    feasible lambda found by bisection (exact up to the duality gap of the integer problem).
    Rates may be float32 (bit counts below 2**24 are exact there); totals are summed in float64.
    `device` (e.g. the GPU) is where the bisection runs; the widths come back on the CPU (on `device`
    with keep_device). Rates that grow by a constant per bit (affine_steps) take a closed form per lambda.
    """
    n, nb = rate.shape
    device = torch.device(device) if device is not None else weight.device
    kap = kappa(nb - 1) if kap is None else kap
    kap = kap[:nb].to(device, torch.float64)
    R = rate.to(device) if rate.dtype in (torch.float32, torch.float64) else rate.to(device, torch.float64)
    if float(R[:, 0].sum(dtype=torch.float64)) > budget:
        raise ValueError("the budget is below the narrowest widths' rate")
    out = (lambda w: w) if keep_device else (lambda w: w.cpu())
    total = lambda w: float(R.gather(1, w[:, None]).sum(dtype=torch.float64))
    widest = torch.full((n,), nb - 1, dtype=torch.long, device=device)
    if total(widest) <= budget:
        return out(widest)
    wt = weight.to(device, torch.float64)
    s = affine_steps(R, kap)
    if s is not None:  # closed form per lambda: w / s against lam / (kap[b-1] - kap[b])
        dk = kap[:-1] - kap[1:]
        ratio = wt / s.to(torch.float64)
        base = float(R[:, 0].sum(dtype=torch.float64))
        s64 = s.to(torch.float64)
        at = lambda lam: _affine_widths(lam, ratio, dk)
        total = lambda w: base + float((s64 * w).sum())
        hi = max(float(ratio.max()) * float(dk[0]), 1e-30) * 2
    else:
        D = wt[:, None] * kap[None, :]
        at = lambda lam: widths_at(lam, D, R)
        hi = max(float(D.max()), 1e-30) * 2
    # lambda range: rate differences are >= 1 bit, distortion gaps are bounded by the weights
    lo = 1e-30
    while total(at(hi)) > budget:  # pragma: no cover - only with zero-rate steps
        hi *= 10
    for _ in range(iters):
        mid = math.sqrt(lo * hi)
        if total(at(mid)) <= budget:
            hi = mid
        else:
            lo = mid
        if hi / lo < 1 + 1e-9:
            break
    w = at(hi)
    return out(_fill(w, wt, kap, R, budget - total(w)))


def _fill(w: torch.Tensor, weight: torch.Tensor, kap: torch.Tensor, R: torch.Tensor, slack: float,
          rounds: int = 64) -> torch.Tensor:
    """Spend leftover budget greedily: widen cells by one step in order of distortion drop per bit,
    as many per round as fit (a cell at most once per round), until nothing more fits."""
    n, nb = R.shape
    w = w.clone()
    for _ in range(rounds):
        if slack <= 0:
            break
        nxt = (w + 1).clamp(max=nb - 1)
        dr = R.gather(1, nxt[:, None])[:, 0].double() - R.gather(1, w[:, None])[:, 0].double()
        dd = weight * (kap[w] - kap[nxt])
        ok = (nxt > w) & (dr <= slack) & (dr > 0)
        if not bool(ok.any()):
            break
        cand = torch.nonzero(ok).flatten()
        cand = cand[torch.argsort(dd[cand] / dr[cand], descending=True)]
        take = cand[torch.cumsum(dr[cand], 0) <= slack]
        if take.numel() == 0:  # the best one does not fit after all: try the rest one by one next round
            take = cand[:1] if float(dr[cand[0]]) <= slack else cand[:0]
            if take.numel() == 0:
                break
        w[take] += 1
        slack -= float(dr[take].sum())
    return w
