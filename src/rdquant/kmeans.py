"""Batched, weighted 1-D K-means (Lloyd) on sorted data: many small sets at once, CPU or CUDA.

In one dimension a cluster is an interval of the sorted values, so one Lloyd step is: midpoints of the
sorted centroids -> cut positions (searchsorted) -> interval sums from prefix sums. A step costs
O(B k log n) after one O(B n log n) sort, with no [B, n, k] distance tensor and no Python loop over
the sets. Sets may ask for different k: unused centroid slots are +inf and never win a point.
"""

from __future__ import annotations

import math

import torch

INF = float("inf")


def _k_per_row(k: int | torch.Tensor, B: int, device: torch.device) -> tuple[torch.Tensor, int]:
    if isinstance(k, int):
        return torch.full((B,), k, dtype=torch.long, device=device), k
    k = k.to(device=device, dtype=torch.long)
    return k, int(k.max()) if k.numel() else 1


def kmeans_1d(
    x: torch.Tensor,
    k: int | torch.Tensor,
    weight: torch.Tensor | None = None,
    iters: int = 30,
    init: torch.Tensor | None = None,
    tol: float = 0.0,
    rounds: int = 4,
) -> torch.Tensor:
    """Centroids [B, kmax] (ascending; +inf past each row's k) of the weighted K-means of each row of x.

    x, weight: [B, n] (weight >= 0; weight 0 excludes a value). k: one k, or a LongTensor [B].
    Initialised at the weighted quantiles (i + 1/2)/k, or at `init` [B, kmax]; runs `iters` Lloyd
    steps or until no centroid moves by more than `tol`. Without `init`, three deterministic starts run
    and each gets `rounds` split-merge moves (Lloyd alone stalls on heavy tails); the best is kept per
    row. An empty cluster keeps its centroid; a row with no weight gets centroids 0.
    """
    if x.dim() != 2:
        raise ValueError("x must be [B, n]")
    B, n = x.shape
    kr, kmax = _k_per_row(k, B, x.device)
    if init is not None:
        kmax = max(kmax, init.shape[1])
    if kr.numel() and int(kr.min()) < 1:
        raise ValueError("k must be >= 1")
    xs, order = x.to(torch.float64).sort(dim=1)
    ws = torch.ones_like(xs) if weight is None else weight.to(torch.float64).gather(1, order)
    zero = torch.zeros(B, 1, dtype=torch.float64, device=x.device)
    cw = torch.cat([zero, ws.cumsum(1)], 1)  # [B, n+1]
    cx = torch.cat([zero, (ws * xs).cumsum(1)], 1)
    total = cw[:, -1:]
    slot = torch.arange(kmax, device=x.device)
    valid = slot[None, :] < kr[:, None]  # [B, kmax]
    if init is not None:
        return _lloyd(xs, cw, cx, init.to(torch.float64), valid, total, iters, tol).to(x.dtype)
    # two deterministic starts, keep the better per row: weighted quantiles (good for the bulk) and
    # an even split of the range (good for heavy tails, where quantile starts miss the extremes)
    frac = (slot[None, :].to(torch.float64) + 0.5) / kr[:, None].to(torch.float64)
    idx = torch.searchsorted(cw[:, 1:].contiguous(), (frac * total).contiguous()).clamp_(max=n - 1)
    live = ws > 0
    lo = torch.where(live, xs, INF).min(1, keepdim=True).values
    hi = torch.where(live, xs, -INF).max(1, keepdim=True).values
    lo, hi = torch.where(total > 0, lo, 0.0), torch.where(total > 0, hi, 0.0)
    best, best_d = None, None
    # third start: the high-resolution optimum puts centroids with density ~ p(x)^(1/3); over a gap g
    # between neighbours p ~ 1/(n g), so that density's mass there is ~ g^(2/3)
    ar = torch.arange(n, device=x.device).expand(B, n)
    filled = xs.gather(1, torch.where(live, ar, -1).cummax(1).values.clamp_min(0))  # dead -> last live
    first = live.to(torch.uint8).argmax(1, keepdim=True)
    filled = torch.where(ar < first, xs.gather(1, first), filled)
    gap = (filled[:, 1:] - filled[:, :-1]).clamp_min(0)
    cg = torch.cat([zero, gap.pow(2.0 / 3.0).cumsum(1)], 1)
    j = torch.searchsorted(cg.contiguous(), (frac * cg[:, -1:]).contiguous()).clamp_(1, n - 1) if n > 1 else idx
    compand = xs.gather(1, j) if n > 1 else xs.gather(1, idx)
    cq = torch.cat([zero, (ws * xs * xs).cumsum(1)], 1)
    for start in (xs.gather(1, idx), lo + frac * (hi - lo), compand):
        c = _lloyd(xs, cw, cx, start, valid, total, iters, tol)
        c, d = _split_merge(xs, ws, cw, cx, cq, c, valid, total, iters, tol, rounds)
        if best is None:
            best, best_d = c, d
        else:
            better = (d < best_d)[:, None]
            best, best_d = torch.where(better, c, best), torch.minimum(d, best_d)
    return best.to(x.dtype)


def _segments(xs: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """[B, kmax+1] cut positions of the sorted rows between the clusters of centroids c."""
    B, n = xs.shape
    mids = (c[:, 1:] + c[:, :-1]) * 0.5
    cut = torch.searchsorted(xs, mids.contiguous())
    return torch.cat([torch.zeros(B, 1, dtype=torch.long, device=xs.device), cut,
                      torch.full((B, 1), n, dtype=torch.long, device=xs.device)], 1)


def _split_merge(xs, ws, cw, cx, cq, c, valid, total, iters: int, tol: float, rounds: int):
    """Escape Lloyd's local minima: move the centroid whose removal costs least (merging its cluster
    into a neighbour) into the cluster whose best two-way split gains most, re-run Lloyd, and keep the
    move where the distortion drops. Returns (centroids, distortion)."""
    d = _sorted_distortion(xs, cw, cx, cq, c)
    k = c.shape[1]
    if k < 2:
        return c, d
    ar = torch.arange(k, device=xs.device)
    for _ in range(rounds):
        b = _segments(xs, c)
        lo, hi = b[:, :-1], b[:, 1:]
        sum_ = lambda p, a, z: p.gather(1, z) - p.gather(1, a)
        W, S, Q = sum_(cw, lo, hi), sum_(cx, lo, hi), sum_(cq, lo, hi)
        sse = lambda W, S, Q: (Q - S * S / W.clamp_min(1e-300)).clamp_min(0)
        e = sse(W, S, Q)
        # merging cluster j with its right neighbour: contiguous union
        Wm, Sm, Qm = W[:, :-1] + W[:, 1:], S[:, :-1] + S[:, 1:], Q[:, :-1] + Q[:, 1:]
        merge = sse(Wm, Sm, Qm) - e[:, :-1] - e[:, 1:]  # [B, k-1]
        merge = torch.where(valid[:, :-1] & valid[:, 1:], merge, INF)  # never "merge" into an unused slot
        inf = torch.full_like(merge[:, :1], INF)
        right, left = torch.cat([merge, inf], 1), torch.cat([inf, merge], 1)
        cost = torch.minimum(right, left)
        cost = torch.where(valid & (W > 0), cost, torch.where(valid, 0.0, INF))
        j = cost.argmin(1, keepdim=True)
        nb = torch.where(right.gather(1, j) <= left.gather(1, j), j + 1, j - 1)
        # splitting cluster m at its best cut p (left = sorted values [lo, p), right = [p, hi))
        B, n = xs.shape
        pos = torch.arange(1, n, device=xs.device).expand(B, n - 1)
        cl = torch.searchsorted(hi.contiguous(), pos.contiguous(), right=True).clamp(max=k - 1)
        plo, phi = lo.gather(1, cl), hi.gather(1, cl)
        pW = cw[:, 1:n] - cw.gather(1, plo)
        pS = cx[:, 1:n] - cx.gather(1, plo)
        pQ = cq[:, 1:n] - cq.gather(1, plo)
        pg = e.gather(1, cl) - sse(pW, pS, pQ) - sse(W.gather(1, cl) - pW, S.gather(1, cl) - pS, Q.gather(1, cl) - pQ)
        pg = torch.where((pos > plo) & (pos < phi) & (pW > 0) & (W.gather(1, cl) - pW > 0), pg, -INF)
        best = torch.full_like(e, -INF).scatter_reduce(1, cl, pg, "amax")
        at = torch.where(pg >= best.gather(1, cl), pos, n)
        cut = torch.full_like(lo, n).scatter_reduce(1, cl, at, "amin").clamp(max=n)
        cut = torch.where(cut >= n, lo, cut)  # no valid cut: empty left part, never chosen below
        Wl, Sl, Ql = sum_(cw, lo, cut), sum_(cx, lo, cut), sum_(cq, lo, cut)
        Wr, Sr, Qr = W - Wl, S - Sl, Q - Ql
        gain = e - sse(Wl, Sl, Ql) - sse(Wr, Sr, Qr)
        gain = torch.where(valid & (Wl > 0) & (Wr > 0) & (ar != j) & (ar != nb), gain, -INF)
        m = gain.argmax(1, keepdim=True)
        go = (gain.gather(1, m) > cost.gather(1, j)).squeeze(1)
        if not bool(go.any()):
            break
        new = c.clone()
        new.scatter_(1, j, (Sl / Wl.clamp_min(1e-300)).gather(1, m))
        new.scatter_(1, m, (Sr / Wr.clamp_min(1e-300)).gather(1, m))
        new = _lloyd(xs, cw, cx, new, valid, total, iters, tol)
        nd = _sorted_distortion(xs, cw, cx, cq, new)
        better = go & (nd < d)
        c = torch.where(better[:, None], new, c)
        d = torch.where(better, nd, d)
    return c, d


def _sorted_distortion(xs, cw, cx, cq, c) -> torch.Tensor:
    """Weighted squared error of sorted rows against centroids c, from prefix sums (no per-value search)."""
    b = _segments(xs, c)
    seg = lambda p: p.gather(1, b[:, 1:]) - p.gather(1, b[:, :-1])
    W, S, Q = seg(cw), seg(cx), seg(cq)
    cc = torch.where(torch.isfinite(c), c, 0.0)
    return (Q - 2 * cc * S + cc * cc * W).sum(1).clamp_min(0)


FUSED_LLOYD: bool | None = None  # the Triton kernel (kernels/kmeans_triton.py): None = on CUDA


def _fused_lloyd(xs: torch.Tensor):
    """The fused Lloyd kernel's module when it applies here, else None."""
    if FUSED_LLOYD is False or (FUSED_LLOYD is None and not xs.is_cuda) or xs.numel() == 0:
        return None
    try:
        from .kernels import kmeans_triton
    except ImportError:  # pragma: no cover - no triton: the torch steps do the same
        return None
    return kmeans_triton


def _lloyd(xs, cw, cx, c, valid, total, iters: int, tol: float) -> torch.Tensor:
    """Lloyd steps on sorted rows xs with prefix sums cw (weights) and cx (weighted values)."""
    B, n = xs.shape
    c = torch.where(valid, c, INF).sort(dim=1).values
    fused = _fused_lloyd(xs)
    if fused is not None:  # all steps in one kernel (no early stop: a converged set no longer moves)
        c = fused.lloyd(xs, cw, cx, c, valid.sum(1), iters)
        iters = 0
    for _ in range(iters):
        bounds = _segments(xs, c)  # values < midpoint go left; inf centroids get empty segments
        sw = cw.gather(1, bounds[:, 1:]) - cw.gather(1, bounds[:, :-1])
        sx = cx.gather(1, bounds[:, 1:]) - cx.gather(1, bounds[:, :-1])
        new = torch.where((sw > 0) & valid, sx / sw.clamp_min(1e-300), c)
        converged = xs.device.type == "cpu" and (  # on a GPU the check's sync costs more than a step
            not B or float(torch.nan_to_num((new - c).abs(), nan=0.0, posinf=0.0).max()) <= tol)
        c = new.sort(dim=1).values
        if converged:
            break
    return torch.where(valid & (total > 0), c, torch.where(valid, 0.0, INF))


def nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid for every value: x [B, n], centroids [B, kmax] ascending (inf
    padded) -> LongTensor [B, n]. Ties go to the lower centroid."""
    mids = (centroids[:, 1:] + centroids[:, :-1]) * 0.5
    return torch.searchsorted(mids.contiguous(), x.contiguous(), right=False)


def distortion(x: torch.Tensor, centroids: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted squared error per row of snapping x to its nearest centroid."""
    q = centroids.gather(1, nearest(x, centroids))
    d = (x - q).square()
    return (d if weight is None else d * weight).sum(1)


def rate_assign(x: torch.Tensor, centroids: torch.Tensor, weight: torch.Tensor, mu: torch.Tensor,
                code_bits: torch.Tensor) -> torch.Tensor:
    """Entropy-constrained assignment: per value the index j minimising weight*(x - c_j)^2 + mu*bits_j,
    so that a code's cost in bits counts against its distortion. x, weight [B, n]; centroids, code_bits
    [B, kmax] (inf = unused slot); mu [B] (distortion per bit). mu = 0 is `nearest` (ties low)."""
    d = (x[:, :, None] - centroids[:, None, :]).square() * weight[:, :, None]
    cost = d + mu[:, None, None] * code_bits[:, None, :]
    cost = torch.where(torch.isfinite(centroids)[:, None, :], torch.nan_to_num(cost, nan=INF), INF)
    return cost.argmin(2)


def code_lengths(codes: torch.Tensor, count: torch.Tensor, kmax: int, prior: torch.Tensor | None = None) -> torch.Tensor:
    """Ideal code lengths -log2 p_j [B, kmax] of each row's codes (rows [B, n], entries with count
    False left out) plus `prior` counts [B, kmax]; an unused code counts as half an occurrence."""
    n = torch.zeros(codes.shape[0], kmax, dtype=torch.float64, device=codes.device) if prior is None else prior.to(torch.float64).clone()
    n.scatter_add_(1, codes, count.to(torch.float64))
    total = n.sum(1, keepdim=True).clamp_min(1)
    return -torch.log2(torch.where(n > 0, n, 0.5) / total)


def ec_refine(x: torch.Tensor, centroids: torch.Tensor, weight: torch.Tensor, count: torch.Tensor,
              lam: float, iters: int = 6, prior: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entropy-constrained Lloyd (Chou, Lookabaugh & Gray) from K-means centroids [B, kmax]: assign by
    rate_assign, move each centroid to its values' weighted mean, re-estimate the code lengths.
    mu = lam * 2 ln 2 * (the K-means distortion per value): lam = 1 trades bits for distortion at the
    high-rate slope of the starting quantizer. `prior` [B, kmax]: code counts of what is coded with the
    same table (other columns), added when estimating lengths. Returns (centroids ascending, code
    lengths, mu)."""
    c = centroids.to(torch.float64)
    xd, wd = x.to(torch.float64), weight.to(torch.float64)
    kmax = c.shape[1]
    code = nearest(xd, c)
    per = count.sum(1).clamp_min(1)
    d0 = ((xd - c.gather(1, code).nan_to_num(0.0)).square() * wd * count).sum(1) / per
    mu = lam * 2 * math.log(2) * d0
    bits = code_lengths(code, count, kmax, prior)
    for _ in range(iters):
        code = rate_assign(xd, c, wd, mu, bits)
        sw = torch.zeros_like(c).scatter_add_(1, code, wd * count)
        sx = torch.zeros_like(c).scatter_add_(1, code, wd * xd * count)
        c = torch.where(torch.isfinite(c) & (sw > 0), sx / sw.clamp_min(1e-300), c)
        bits = code_lengths(code, count, kmax, prior)
        c, order = c.sort(1)  # keep the codebook ascending (inf slots last); lengths follow their entry
        bits = bits.gather(1, order)
    return c.to(centroids.dtype), bits.to(torch.float32), mu.to(torch.float32)
