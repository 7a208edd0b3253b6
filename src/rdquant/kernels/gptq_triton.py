"""GPTQ's inner column loop for one lazy block as one Triton kernel (affine grids and column codebooks).

The Python sweep launches ~8 small kernels per column (round, dequantize, error, rank-1 update):
about 26,000 columns per Llama-8B block, latency-bound. Rows are independent in that loop, so each
program owns a tile of rows and runs all of the block's columns with the tile in registers, then the
later columns of the tile move by -Hinv[i, j] err, err = (w - deq) / Hinv[i, i]. The rounding rule:

- affine: q = clamp(rint(w / s) + z, 0, maxq), deq = (q - z) s (grid.quantize, qtensor.dequantize_codes);
- codebook (CLAQ): x = w / r (the row's scale), q = the nearest entry of the (column, part) codebook
  (ties to the lower one, kmeans.nearest), deq = entry x r, or w in fp16 where the outlier mask is set.

Rounding (round half to even) and division are IEEE, as in the torch reference; the update may fuse
multiply-adds, so results equal the Python loop's up to float rounding. The trailing update beyond
the block stays a GEMM in gptq.gptq_sweep.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: (x + M) - M rounds an fp32 |x| < 2**22 to the nearest integer, ties to even


@triton.jit
def _sweep_kernel(W, H, A, Bt, Ct, PART, OM, CODES, E, WR, QO, R, Bn, ldh, n_parts,
                  BLOCK: tl.constexpr, BR: tl.constexpr, KMAX: tl.constexpr, LOGK: tl.constexpr, CODEBOOK: tl.constexpr,
                  MASK: tl.constexpr):
    # affine: A, Bt, Ct = scales, zeros, max codes [Bn, R]; codebook: A = row scales [Bn, R],
    # Bt = codebooks [Bn * n_parts, KMAX] (inf past each one's size), PART = part of each row [R]
    pid = tl.program_id(0)
    r = pid * BR + tl.arange(0, BR)
    rmask = r < R
    j = tl.arange(0, BLOCK)
    jmask = j < Bn
    w = tl.load(W + j[:, None] * R + r[None, :], mask=jmask[:, None] & rmask[None, :], other=0.0)
    if CODEBOOK:
        part = tl.load(PART + r, mask=rmask, other=0)
    for i in range(0, Bn):
        wi = tl.sum(tl.where(j[:, None] == i, w, 0.0), axis=0)
        if CODEBOOK:
            rs = tl.load(A + i * R + r, mask=rmask, other=1.0)
            x = tl.math.div_rn(wi, rs)
            # the nearest entry = how many midpoints (c[t] + c[t+1]) / 2 lie below x: the midpoints of an
            # ascending codebook ascend, so a binary search finds it in log2(KMAX) steps
            base = (i * n_parts + part) * KMAX
            q = tl.zeros([BR], dtype=tl.int32)
            for t in tl.static_range(LOGK):
                c = q + (KMAX >> (t + 1))
                lo = tl.load(Bt + base + c - 1, mask=rmask, other=0.0)
                hi = tl.load(Bt + base + c, mask=rmask, other=0.0)
                q = tl.where((lo + hi) * 0.5 < x, c, q)
            deq = tl.load(Bt + base + q, mask=rmask, other=0.0) * rs
            if MASK:
                om = tl.load(OM + i * R + r, mask=rmask, other=0)
                deq = tl.where(om != 0, wi.to(tl.float16).to(tl.float32), deq)
            tl.store(WR + i * R + r, wi, mask=rmask)
            tl.store(QO + i * R + r, deq, mask=rmask)
        else:
            s = tl.load(A + i * R + r, mask=rmask, other=1.0)
            z = tl.load(Bt + i * R + r, mask=rmask, other=0.0)
            m = tl.load(Ct + i * R + r, mask=rmask, other=0.0)
            x = tl.math.div_rn(wi, s)
            x = tl.where(tl.abs(x) < 4194304.0, (x + _MAGIC) - _MAGIC, x)
            q = tl.minimum(tl.maximum(x + z, 0.0), m)
            deq = (q - z) * s
        d = tl.load(H + i * ldh + i)
        err = tl.math.div_rn(wi - deq, d)
        tl.store(CODES + i * R + r, q.to(tl.uint8), mask=rmask)
        tl.store(E + i * R + r, err, mask=rmask)
        h = tl.load(H + i * ldh + j, mask=jmask & (j > i), other=0.0)
        w = w - h[:, None] * err[None, :]


def _launch(W1: torch.Tensor, Hinv1: torch.Tensor, kmax: int) -> tuple:
    """(codes, errors, grid, meta-parameters, Hinv1 row-major) of a launch over W1's rows."""
    Bn, R = W1.shape
    if Hinv1.stride(1) != 1:
        Hinv1 = Hinv1.contiguous()
    C1 = torch.empty(Bn, R, dtype=torch.uint8, device=W1.device)
    E1 = torch.empty(Bn, R, dtype=torch.float32, device=W1.device)
    block = max(16, triton.next_power_of_2(Bn))
    br = 32 if block <= 128 else 16
    return C1, E1, (triton.cdiv(R, br),), dict(BLOCK=block, BR=br, KMAX=kmax, LOGK=kmax.bit_length() - 1, num_warps=4), Hinv1


def gptq_block(W1: torch.Tensor, Hinv1: torch.Tensor, S1: torch.Tensor, Z1: torch.Tensor,
               maxq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 [B, R], errors fp32 [B, R]) of a lazy block: W1 [B, R] the block's columns (one row
    per column), Hinv1 [B, B] its part of the inverse-Hessian Cholesky factor (row-major, any leading
    stride), S1/Z1/maxq [B, R] each column's per-row grid."""
    W1, S1, Z1, maxq = (t.to(torch.float32).contiguous() for t in (W1, S1, Z1, maxq))
    C1, E1, grid, meta, Hinv1 = _launch(W1, Hinv1, 2)
    _sweep_kernel[grid](W1, Hinv1, S1, Z1, maxq, W1, W1, C1, E1, W1, W1, W1.shape[1], W1.shape[0], Hinv1.stride(0), 1,
                        CODEBOOK=False, MASK=False, **meta)
    return C1, E1


def codebook_block(W1: torch.Tensor, Hinv1: torch.Tensor, scales: torch.Tensor, books: torch.Tensor,
                   part: torch.Tensor, outliers: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8, errors, values as reached, dequantized values), each [B, R], of a lazy block on
    column codebooks: W1 [B, R], Hinv1 [B, B] as in gptq_block; scales [B, R] each column's row scale;
    books [B, P, k] ascending (inf = unused entry) the codebook of each (column, part); part [R] the
    part of each row; outliers [B, R] bool: entries kept in fp16 instead of coded."""
    W1, scales = W1.to(torch.float32).contiguous(), scales.to(torch.float32).contiguous()
    Bn, P, k = books.shape
    kmax = max(2, triton.next_power_of_2(k))
    cb = torch.full((Bn, P, kmax), float("inf"), dtype=torch.float32, device=W1.device)
    cb[:, :, :k] = books
    C1, E1, grid, meta, Hinv1 = _launch(W1, Hinv1, kmax)
    reached, deq = torch.empty_like(W1), torch.empty_like(W1)
    om = W1 if outliers is None else outliers.to(torch.uint8).contiguous()
    _sweep_kernel[grid](W1, Hinv1, scales, cb, cb, part.to(torch.int32).contiguous(), om, C1, E1, reached, deq,
                        W1.shape[1], Bn, Hinv1.stride(0), P, CODEBOOK=True, MASK=outliers is not None, **meta)
    return C1, E1, reached, deq
