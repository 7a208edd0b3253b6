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


_INT64_MIN = -(1 << 63)
_CHUNK = 1 << 22  # cells per step of every pass over the cells (Cells, widths_at): bounds their temporaries


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
    w = Cells(weight, rate, kap, device).waterfill(budget, iters).long()
    return w if keep_device else w.cpu()


class Cells:
    """The allocation's cells where it runs (`device`): weights [n] (float64) and, when every cell's rate grows
    by the same amount per bit (affine_steps: uniform grids), that step [n] (float32) and the width-0 total,
    else the whole rate table [n, B+1]. Every pass goes _CHUNK cells at a time and widths are uint8, so an
    affine allocation holds 13 bytes a cell there, whatever the depth (the table's [n, B+1] copy and the
    passes' [n]-long temporaries took 6.4 GiB of GPU memory for an 8B model's 54M cells)."""

    def __init__(self, weight: torch.Tensor, rate: torch.Tensor, kap: torch.Tensor | None = None,
                 device: str | torch.device | None = None) -> None:
        self.n, self.nb = rate.shape
        self.device = torch.device(device) if device is not None else weight.device
        kap = kappa(self.nb - 1) if kap is None else kap
        self.kap = kap[: self.nb].to(self.device, torch.float64)
        self.dk = self.kap[:-1] - self.kap[1:]
        self.wt = weight.to(self.device, torch.float64)
        self.base = float(rate[:, 0].sum(dtype=torch.float64))
        self.s: torch.Tensor | None = torch.empty(self.n, dtype=rate.dtype, device=self.device)
        for a, b in self.chunks():
            s = affine_steps(rate[a:b].to(self.device), self.kap)
            if s is None:
                self.s = None
                break
            self.s[a:b] = s
        self.R = None
        if self.s is None:
            dtype = rate.dtype if rate.dtype in (torch.float32, torch.float64) else torch.float64
            self.R = rate.to(self.device, dtype)
        self.offset = self.base if self.R is None else 0.0  # what _part leaves out of a total (the width-0 rates)

    def chunks(self):
        return ((a, min(a + _CHUNK, self.n)) for a in range(0, self.n, _CHUNK))

    def step(self, a: int, b: int, w0: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
        """rate[i, w1] - rate[i, w0] (float64) of cells a:b, widths long."""
        if self.R is None:
            return self.s[a:b].double() * (w1 - w0)
        R = self.R[a:b]
        return R.gather(1, w1[:, None])[:, 0].double() - R.gather(1, w0[:, None])[:, 0].double()

    def _part(self, a: int, b: int, w: torch.Tensor) -> float:
        """The rate of cells a:b at widths w (long), less their width-0 rates when affine: float64, exact for
        integer bit counts in any order."""
        if self.R is None:
            return float((self.s[a:b].double() * w).sum())
        return float(self.R[a:b].gather(1, w[:, None]).sum(dtype=torch.float64))

    def total(self, w: torch.Tensor) -> float:
        """Total rate at widths w [n]."""
        return self.offset + sum(self._part(a, b, w[a:b].long()) for a, b in self.chunks())

    def _ratio(self, a: int, b: int) -> torch.Tensor:
        """weight / rate step of affine cells a:b (float64): what the closed form compares with lam / dk."""
        return self.wt[a:b] / self.s[a:b].to(torch.float64)

    def _at(self, lam: float, a: int, b: int) -> torch.Tensor:
        """argmin_b weight kap[b] + lam rate[b] of cells a:b (ties to the narrower), long."""
        if self.R is None:
            return _affine_widths(lam, self._ratio(a, b), self.dk)
        return widths_at(lam, self.wt[a:b, None] * self.kap[None, :], self.R[a:b])

    def widths_at(self, lam: float) -> torch.Tensor:
        w = torch.empty(self.n, dtype=torch.uint8, device=self.device)
        for a, b in self.chunks():
            w[a:b] = self._at(lam, a, b)
        return w

    def total_at(self, lam: float) -> float:
        return self.offset + sum(self._part(a, b, self._at(lam, a, b)) for a, b in self.chunks())

    def waterfill(self, budget: float, iters: int = 100) -> torch.Tensor:
        """waterfill()'s widths [n] (uint8, on the device)."""
        if self.base > budget:
            raise ValueError("the budget is below the narrowest widths' rate")
        widest = torch.full((self.n,), self.nb - 1, dtype=torch.uint8, device=self.device)
        if self.total(widest) <= budget:
            return widest
        if self.R is None:  # closed form per lambda: w / s against lam / (kap[b-1] - kap[b])
            top = max((float(self._ratio(a, b).max()) for a, b in self.chunks()), default=0.0)
            hi = max(top * float(self.dk[0]), 1e-30) * 2
        else:
            top = max((float((self.wt[a:b, None] * self.kap[None, :]).max()) for a, b in self.chunks()), default=0.0)
            hi = max(top, 1e-30) * 2
        # lambda range: rate differences are >= 1 bit, distortion gaps are bounded by the weights
        lo = 1e-30
        while self.total_at(hi) > budget:  # pragma: no cover - only with zero-rate steps
            hi *= 10
        for _ in range(iters):
            mid = math.sqrt(lo * hi)
            if self.total_at(mid) <= budget:
                hi = mid
            else:
                lo = mid
            if hi / lo < 1 + 1e-9:
                break
        w = self.widths_at(hi)
        return self.fill(w, budget - self.total(w))

    def _take(self, w: torch.Tensor, cand, limit: float, reach: bool, descending: bool) -> float:
        """Step by one (up if `descending`, else down) the cells a greedy pass takes in key order (largest key
        first if `descending`): the longest prefix whose rates sum to <= limit, or with `reach` the shortest that
        reaches limit (all when none does). cand(a, b): chunk a:b's candidates (local indices, keys, rates).
        Returns the rates taken. Up to _CHUNK candidates are sorted as one; more are cut at the key where the
        prefix ends, found from histograms of the keys' bit patterns, 16 bits a pass (radix select; one chunk's
        temporaries at a time)."""
        bump = (lambda i: w.index_put_((i,), w[i] + 1)) if descending else (lambda i: w.index_put_((i,), w[i] - 1))

        def ordinal(key: torch.Tensor) -> torch.Tensor:  # float64 -> int64 in the same order, ascending taken first
            bits = (-key if descending else key).to(torch.float64).view(torch.int64)
            return torch.where(bits < 0, bits ^ 0x7FFFFFFFFFFFFFFF, bits)

        parts, count = [], 0  # the candidates while they are few enough to sort as one
        for a, b in self.chunks():
            i, k, r = cand(a, b)
            count += i.numel()
            if count > _CHUNK:
                parts = None
                break
            parts.append((i + a, k, r))
        if count == 0:
            return 0.0
        if parts is not None:
            idx, key, dr = (torch.cat([p[j] for p in parts]) for j in range(3))
            order = torch.argsort(key, descending=descending)
            idx, dr = idx[order], dr[order]
            c = torch.cumsum(dr, 0)
            n = (int(torch.searchsorted(c, torch.tensor([limit], dtype=c.dtype, device=c.device))) + 1 if reach
                 else int((c <= limit).sum()))
            bump(idx[:n])
            return float(dr[:n].sum())

        lo, hi, everything = None, None, 0.0
        for a, b in self.chunks():
            _, k, r = cand(a, b)
            if k.numel():
                o = ordinal(k)
                lo = int(o.min()) if lo is None else min(lo, int(o.min()))
                hi = int(o.max()) if hi is None else max(hi, int(o.max()))
                everything += float(r.sum(dtype=torch.float64))
        over = (lambda m: m >= limit) if reach else (lambda m: m > limit)
        if not over(everything):
            t = hi + 1  # the whole pass fits (or never reaches): every candidate
        elif lo >= 0 or hi < 0:  # one sign: the ordinals map to [0, 2^63) and a radix select finds t in 4 passes
            flip = hi < 0
            prefix, below = 0, 0.0
            for shift in (48, 32, 16, 0):
                hist = torch.zeros(1 << 16, dtype=torch.float64, device=self.device)
                for a, b in self.chunks():
                    _, k, r = cand(a, b)
                    u = ordinal(k) ^ _INT64_MIN if flip else ordinal(k)
                    if shift < 48:
                        keep = (u >> (shift + 16)) == prefix
                        u, r = u[keep], r[keep]
                    hist += torch.bincount((u >> shift) & 0xFFFF, weights=r.to(torch.float64), minlength=1 << 16)
                crossed = over(torch.cumsum(hist, 0) + below)
                d = int(torch.argmax(crossed.to(torch.uint8)))  # the first digit whose prefix goes over
                below += float(hist[:d].sum())
                prefix = (prefix << 16) | d
            t = prefix ^ _INT64_MIN if flip else prefix
        else:  # ordinals of both signs (keys of both signs): bisection over them, a pass per bit

            def mass(t: int) -> float:
                return sum(float(r[ordinal(k) <= t].sum(dtype=torch.float64))
                           for a, b in self.chunks() for _, k, r in [cand(a, b)])

            lo -= 1
            while hi - lo > 1:  # the first key whose prefix (ties included) goes over
                mid = lo + (hi - lo) // 2
                lo, hi = (lo, mid) if over(mass(mid)) else (mid, hi)
            t = hi
        below, ties, tie_dr = 0.0, [], []
        for a, b in self.chunks():
            i, k, r = cand(a, b)
            o = ordinal(k)
            below += float(r[o < t].sum(dtype=torch.float64))
            ties.append(i[o == t] + a)
            tie_dr.append(r[o == t])
            bump(i[o < t] + a)
        ties, tie_dr = torch.cat(ties), torch.cat(tie_dr)
        c = torch.cumsum(tie_dr, 0) + below
        n = (min(int(torch.searchsorted(c, torch.tensor([limit], dtype=c.dtype, device=c.device))) + 1, ties.numel())
             if reach else int((c <= limit).sum()))
        bump(ties[:n])
        return below + float(tie_dr[:n].sum())

    def fill(self, w: torch.Tensor, slack: float, rounds: int = 64) -> torch.Tensor:
        """Spend leftover budget greedily: widen cells by one step in order of distortion drop per bit,
        as many per round as fit (a cell at most once per round), until nothing more fits."""
        w = w.clone()
        for _ in range(rounds):
            if slack <= 0:
                break
            limit = slack

            def cand(a: int, b: int):
                wc = w[a:b].long()
                nxt = (wc + 1).clamp(max=self.nb - 1)
                dr = self.step(a, b, wc, nxt)
                i = torch.nonzero((nxt > wc) & (dr <= limit) & (dr > 0)).flatten()
                dd = self.wt[a:b][i] * (self.kap[wc[i]] - self.kap[nxt[i]])
                return i, dd / dr[i], dr[i]

            taken = self._take(w, cand, limit, reach=False, descending=True)
            if taken == 0:  # no candidate (the first one always fits when there is one)
                break
            slack -= taken
        return w

    def narrow(self, w: torch.Tensor, excess: float, floor_from: int, floor: int) -> torch.Tensor:
        """Narrow by one step the cells that lose least distortion per bit saved until `excess` bits are saved
        (cells from `floor_from` on stay at least `floor` wide)."""
        w = w.clone()

        def cand(a: int, b: int):  # a pass changes chunk a:b only after its candidates were read
            wc = w[a:b].long()
            prv = (wc - 1).clamp_min(0)
            dr = self.step(a, b, prv, wc)
            lowest = torch.zeros_like(wc)
            if b > floor_from:
                lowest[max(floor_from - a, 0):] = floor
            i = torch.nonzero(wc > lowest).flatten()
            dd = (self.wt[a:b][i] * (self.kap[prv[i]] - self.kap[wc[i]])).to(torch.float64)
            return i, dd / dr[i].clamp_min(1e-9), dr[i]

        self._take(w, cand, excess, reach=True, descending=False)
        return w

    def price(self, w: torch.Tensor) -> float:
        """The most distortion one more bit would still save in any cell (0 when every cell is widest)."""
        best = None
        for a, b in self.chunks():
            wc = w[a:b].long()
            nxt = (wc + 1).clamp(max=self.nb - 1)
            dr = self.step(a, b, wc, nxt)
            dd = (self.wt[a:b] * (self.kap[wc] - self.kap[nxt])).to(torch.float64)
            u = nxt > wc
            if bool(u.any()):
                g = float((dd[u] / dr[u].clamp_min(1e-9)).max())
                best = g if best is None else max(best, g)
        return best if best is not None else 0.0
