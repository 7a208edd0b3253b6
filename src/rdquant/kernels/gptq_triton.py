"""GPTQ's inner column loop for one lazy block as one Triton kernel (affine grids).

The Python sweep launches ~8 small kernels per column (round, dequantize, error, rank-1 update):
about 26,000 columns per Llama-8B block, latency-bound. Rows are independent in that loop, so each
program owns a tile of rows and runs all of the block's columns with the tile in registers:
q = clamp(rint(w / s) + z, 0, maxq), err = (w - (q - z) s) / Hinv[i, i], then the later columns of
the tile move by -Hinv[i, j] err. Rounding (round half to even) and division are IEEE, as in the
torch reference (grid.quantize, qtensor.dequantize_codes); the update may fuse multiply-adds, so
results equal the Python loop's up to float rounding. The trailing update beyond the block stays a
GEMM in gptq.gptq_sweep.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: (x + M) - M rounds an fp32 |x| < 2**22 to the nearest integer, ties to even


@triton.jit
def _gptq_block_kernel(W, H, S, Z, M, C, E, R, Bn, ldh, BLOCK: tl.constexpr, BR: tl.constexpr):
    pid = tl.program_id(0)
    r = pid * BR + tl.arange(0, BR)
    rmask = r < R
    j = tl.arange(0, BLOCK)
    jmask = j < Bn
    w = tl.load(W + j[:, None] * R + r[None, :], mask=jmask[:, None] & rmask[None, :], other=0.0)
    for i in range(0, Bn):
        wi = tl.sum(tl.where(j[:, None] == i, w, 0.0), axis=0)
        s = tl.load(S + i * R + r, mask=rmask, other=1.0)
        z = tl.load(Z + i * R + r, mask=rmask, other=0.0)
        m = tl.load(M + i * R + r, mask=rmask, other=0.0)
        x = tl.math.div_rn(wi, s)
        x = tl.where(tl.abs(x) < 4194304.0, (x + _MAGIC) - _MAGIC, x)
        q = tl.minimum(tl.maximum(x + z, 0.0), m)
        deq = (q - z) * s
        d = tl.load(H + i * ldh + i)
        err = tl.math.div_rn(wi - deq, d)
        tl.store(C + i * R + r, q.to(tl.uint8), mask=rmask)
        tl.store(E + i * R + r, err, mask=rmask)
        h = tl.load(H + i * ldh + j, mask=jmask & (j > i), other=0.0)
        w = w - h[:, None] * err[None, :]


def gptq_block(W1: torch.Tensor, Hinv1: torch.Tensor, S1: torch.Tensor, Z1: torch.Tensor,
               maxq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 [B, R], errors fp32 [B, R]) of a lazy block: W1 [B, R] the block's columns (one row
    per column), Hinv1 [B, B] its part of the inverse-Hessian Cholesky factor (row-major, any leading
    stride), S1/Z1/maxq [B, R] each column's per-row grid."""
    Bn, R = W1.shape
    W1, S1, Z1, maxq = (t.to(torch.float32).contiguous() for t in (W1, S1, Z1, maxq))
    if Hinv1.stride(1) != 1:
        Hinv1 = Hinv1.contiguous()
    C1 = torch.empty(Bn, R, dtype=torch.uint8, device=W1.device)
    E1 = torch.empty(Bn, R, dtype=torch.float32, device=W1.device)
    block = max(16, triton.next_power_of_2(Bn))
    br = 32 if block <= 128 else 16
    _gptq_block_kernel[(triton.cdiv(R, br),)](W1, Hinv1, S1, Z1, maxq, C1, E1, R, Bn, Hinv1.stride(0),
                                              BLOCK=block, BR=br, num_warps=4)
    return C1, E1
