"""Lloyd's iterations of kmeans.kmeans_1d in one Triton kernel: one program per set, all steps inside.

On a GPU the torch version is launch-bound (about 15 small kernels per step, 20 steps, for every lazy
block of CLAQ's sweep). Here a program keeps its set's centroids in registers and per step: midpoints
of neighbours, cut positions by binary search in the sorted values, interval sums from the prefix
sums, new centroids (empty clusters keep theirs), sorted. float64 throughout, as the torch version;
the same arithmetic, so the same centroids.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _lloyd_kernel(XS, CW, CX, C, K, n, iters, KM: tl.constexpr, LOGN: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    t = tl.arange(0, KM)
    valid = t < tl.load(K + b)
    c = tl.load(C + b * KM + t)
    xs, cw, cx = XS + b * n, CW + b * (n + 1), CX + b * (n + 1)
    up = tl.minimum(t + 1, KM - 1)
    down = tl.maximum(t - 1, 0)
    for _ in range(iters):
        nxt = tl.where(t + 1 < KM, tl.gather(c, up, 0), float("inf"))
        mid = (nxt + c) * 0.5  # as kmeans._segments: (c[1:] + c[:-1]) * 0.5; the last cut is n
        lo = tl.zeros([KM], dtype=tl.int32)
        hi = tl.zeros([KM], dtype=tl.int32) + n
        for _s in tl.static_range(LOGN):  # lower bound: how many sorted values lie below mid
            live = lo < hi
            m = (lo + hi) // 2
            v = tl.load(xs + m, mask=live, other=float("inf"))
            go = live & (v < mid)
            lo = tl.where(go, m + 1, lo)
            hi = tl.where(live & (v >= mid), m, hi)
        start = tl.where(t > 0, tl.gather(lo, down, 0), 0)
        sw = tl.load(cw + lo) - tl.load(cw + start)
        sx = tl.load(cx + lo) - tl.load(cx + start)
        new = tl.where((sw > 0) & valid, sx / tl.maximum(sw, 1e-300), c)
        c = tl.sort(new, 0)
    tl.store(C + b * KM + t, c)


def lloyd(xs: torch.Tensor, cw: torch.Tensor, cx: torch.Tensor, c: torch.Tensor, k: torch.Tensor,
          iters: int) -> torch.Tensor:
    """`iters` Lloyd steps: xs [B, n] sorted float64, cw / cx [B, n+1] prefix sums of the weights and
    weighted values, c [B, kmax] sorted initial centroids (+inf past each row's k), k [B] -> centroids."""
    B, n = xs.shape
    kmax = c.shape[1]
    km = max(2, triton.next_power_of_2(kmax))
    cc = torch.full((B, km), float("inf"), dtype=torch.float64, device=xs.device)
    cc[:, :kmax] = c
    _lloyd_kernel[(B,)](xs.contiguous(), cw.contiguous(), cx.contiguous(), cc, k.to(torch.int32).contiguous(), n,
                        iters, KM=km, LOGN=max(1, (n + 1).bit_length()), num_warps=1 if km <= 32 else 4)
    return cc[:, :kmax]
