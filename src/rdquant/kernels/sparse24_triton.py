"""Fused unpack-dequantize-matmul of the 2:4 sparse layout (qsparse; Triton), reading only the packed
kept codes, their 2-bit positions and the group grid: y = x @ W^T.

Repack at load (never on disk): the kept codes [out, in/2] go input-major into matmul_triton's bit planes
(int32 words along the kept dimension), the position nibbles [out, in/4] likewise into one 4-bit plane.
Each program takes BLOCK_N outputs and walks its slice of the input BLOCK_K dense columns at a time: it
reads BLOCK_K/2 kept codes and BLOCK_K/4 nibbles per output. For a few activation rows (GEMV) each kept
code meets the input at its position, picked from the run's four by two selects (half the products of a
dense GEMV); for more rows the kept values are placed at their offsets in a dense [BLOCK_K, BLOCK_N]
register tile (zeros elsewhere) for tl.dot. Memory traffic is the packed form's; the tensor-core multiply
is dense (no sparse tensor-core instruction yet). Slices of the input are summed as the affine kernel's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .matmul_triton import SplitCounters, _codes, _exact_f32, _finish, _plane, _plane_args, as_rows, pack_planes, split_plan

PAD_K = 256  # the dense input dimension is padded to a multiple of the largest tile


@triton.jit
def _grid_at(s_ptr, z_ptr, cols, rn, nmask, K, N, GROUP: tl.constexpr):
    """(scale, zero) fp32 [J, BLOCK_N] of the dense columns cols [J, BLOCK_N]."""
    g = cols // GROUP
    m = (cols < K) & nmask[None, :]
    s = tl.load(s_ptr + g * N + rn[None, :], mask=m, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + g * N + rn[None, :], mask=m, other=0).to(tl.float32)
    return s, z


@triton.jit
def _sparse24_kernel(x_ptr, p0, p1, p2, m_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, k_per_split, n_split,
                     stride_xm, stride_ym,
                     B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr, GROUP: tl.constexpr,
                     SPLIT: tl.constexpr, SCALE_PER_TILE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[M, N] = x[M, K] @ W^T for a 2:4 layer, the input cut into n_split slices. BLOCK_M == 1: one
    activation row per program (GEMV), each kept value times the input it sits at, picked from the run's
    four; else the kept values are placed in a dense tile for tl.dot. SCALE_PER_TILE: the step lies in
    one group, so one scale and zero point per output (sum q x - z sum x, then times s)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    J: tl.constexpr = BLOCK_K // 4  # runs of four per step
    k_start = pid_k * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, K)
    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_stop, BLOCK_K):
        q = _codes(p0, p1, p2, k0 // 2, rn, N, nmask, B0, B1, B2, BLOCK_K // 2, BLOCK_N)  # [2J, N] kept codes
        nib = _plane(m_ptr, k0 // 32, rn, N, nmask, 4, J, BLOCK_N)  # [J, N] position nibbles
        q0, q1 = tl.split(tl.permute(tl.reshape(_exact_f32(q), (J, 2, BLOCK_N)), (0, 2, 1)))
        i0 = nib & 3  # 0..2
        i1 = (nib >> 2) & 3  # 1..3
        run = k0 + 4 * tl.arange(0, J)[:, None]  # dense column of each run's first input
        if BLOCK_M == 1:
            xr = x_ptr + pid_m * stride_xm + k0 + 4 * tl.arange(0, J)
            rmask = k0 + 4 * tl.arange(0, J) < k_stop  # K is a multiple of 4: a run is in or out whole
            xa = tl.load(xr, mask=rmask, other=0.0).to(tl.float32)[:, None]
            xb = tl.load(xr + 1, mask=rmask, other=0.0).to(tl.float32)[:, None]
            xc = tl.load(xr + 2, mask=rmask, other=0.0).to(tl.float32)[:, None]
            xd = tl.load(xr + 3, mask=rmask, other=0.0).to(tl.float32)[:, None]
            x0 = tl.where(i0 == 0, xa, tl.where(i0 == 1, xb, xc))
            x1 = tl.where(i1 == 3, xd, tl.where(i1 == 2, xc, xb))
            if SCALE_PER_TILE:
                g = k0 // GROUP
                s = tl.load(s_ptr + g * N + rn, mask=nmask, other=0.0).to(tl.float32)
                z = tl.load(z_ptr + g * N + rn, mask=nmask, other=0).to(tl.float32)
                acc += s * (tl.sum(q0 * x0 + q1 * x1, axis=0) - z * tl.sum(x0 + x1, axis=0))
            else:
                s0, z0 = _grid_at(s_ptr, z_ptr, run + i0, rn, nmask, K, N, GROUP)
                s1, z1 = _grid_at(s_ptr, z_ptr, run + i1, rn, nmask, K, N, GROUP)
                acc += tl.sum((q0 - z0) * s0 * x0 + (q1 - z1) * s1 * x1, axis=0)
        else:
            if SCALE_PER_TILE:
                g = k0 // GROUP
                s = tl.load(s_ptr + g * N + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
                z = tl.load(z_ptr + g * N + rn, mask=nmask, other=0).to(tl.float32)[None, :]
                v0 = (q0 - z) * s
                v1 = (q1 - z) * s
            else:
                s0, z0 = _grid_at(s_ptr, z_ptr, run + i0, rn, nmask, K, N, GROUP)
                s1, z1 = _grid_at(s_ptr, z_ptr, run + i1, rn, nmask, K, N, GROUP)
                v0 = (q0 - z0) * s0
                v1 = (q1 - z1) * s1
            c0 = tl.where(i0 == 0, v0, 0.0)
            c1 = tl.where(i0 == 1, v0, tl.where(i1 == 1, v1, 0.0))
            c2 = tl.where(i0 == 2, v0, tl.where(i1 == 2, v1, 0.0))
            c3 = tl.where(i1 == 3, v1, 0.0)
            # [J, N, b, a] holds c_{2a + b}; as [J, a, b, N] -> dense rows 4j + 2a + b
            w = tl.reshape(tl.permute(tl.join(tl.join(c0, c1), tl.join(c2, c3)), (0, 3, 2, 1)), (BLOCK_K, BLOCK_N))
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk < k_stop)[None, :],
                        other=0.0)
            acc += tl.dot(x, w.to(x.dtype), out_dtype=tl.float32)
    _finish(acc, y_ptr, ws_ptr, cnt_ptr, pid_m, pid_n, pid_k, rm, rn, nmask, M, N, n_split, stride_ym, SPLIT, BLOCK_M)


@dataclass
class PackedSparse24(SplitCounters):
    """A 2:4 layer in the kernel's layout: kept-code planes [K_pad/2 * p / 32, out] and one 4-bit nibble
    plane [K_pad/4 * 4 / 32, out] (int32, input-major), scales [n_groups, out] fp16, zero points
    [n_groups, out] uint8 (symmetric: 2^(bits-1) stored)."""

    planes: list[torch.Tensor]
    meta: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    in_features: int
    out_features: int

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.planes, self.meta, self.scales, self.zeros))


def repack_sparse24(codes: torch.Tensor, idx: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    bits: int, group_size: int) -> PackedSparse24:
    """Kept codes [out, in/2] (uint8), kept offsets [out, in/4, 2], scales [out, n_groups] and zero points
    (None: symmetric) into the kernel's planes; the input is padded to a multiple of PAD_K."""
    if not 1 <= bits <= 8:
        raise ValueError(f"the 2:4 kernel takes widths 1..8, not {bits}")
    out_f, half = codes.shape
    in_f = 2 * half
    k_pad = -(-in_f // PAD_K) * PAD_K
    kept = torch.zeros(k_pad // 2, out_f, dtype=torch.uint8, device=codes.device)
    kept[:half] = codes.t()
    nib = torch.zeros(k_pad // 4, out_f, dtype=torch.uint8, device=codes.device)
    nib[: in_f // 4] = (idx[..., 0] | (idx[..., 1] << 2)).to(torch.uint8).t()
    if zeros is None:
        zeros = torch.full(scales.shape, 1 << (bits - 1), dtype=torch.uint8, device=codes.device)
    G = in_f if group_size == -1 else group_size
    return PackedSparse24(pack_planes(kept, bits), pack_planes(nib, 4)[0], scales.to(torch.float16).t().contiguous(),
                          zeros.to(torch.uint8).t().contiguous(), bits, G, in_f, out_f)


def sparse24_matmul(x: torch.Tensor, p: PackedSparse24, block_n: int | None = None, block_k: int = 64,
                    num_warps: int | None = None, split_k: int | None = None) -> torch.Tensor:
    """x [..., in] @ W^T for the packed 2:4 layer p: [..., out] in x's dtype. `block_k` (dense columns
    per step) is a multiple of 64; `split_k` slices the input over more programs (default: ~1,500
    programs, as the affine kernel)."""
    if block_k % 64:
        raise ValueError("block_k must be a multiple of 64")
    shape, x2 = x.shape, as_rows(x, p.in_features)
    M, K = x2.shape
    N = p.out_features
    gemv = M < 8
    block_m = 1 if gemv else 16 if M <= 16 else 32
    if block_n is None:
        block_n = 32 if gemv else 64
    group = p.group_size if p.group_size < K else 1 << 30  # one group: every step is in it
    rows = M if gemv else triton.cdiv(M, block_m)
    tiles = rows * triton.cdiv(N, block_n)
    split_k, k_per_split = split_plan(K, block_k, tiles, split_k)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    ws = torch.empty(split_k * M * N if split_k > 1 else 1, dtype=torch.float32, device=x.device)
    (q0, q1, q2), (b0, b1, b2) = _plane_args(p.planes, p.bits)
    grid = (rows, triton.cdiv(N, block_n), split_k)
    _sparse24_kernel[grid](x2, q0, q1, q2, p.meta, p.scales, p.zeros, y, ws, p.counters(tiles, x.device), M, N, K,
                           k_per_split, split_k, x2.stride(0), y.stride(0),
                           B0=b0, B1=b1, B2=b2, GROUP=group, SPLIT=split_k > 1, SCALE_PER_TILE=group % block_k == 0,
                           BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps or (2 if gemv else 4))
    return y.reshape(*shape[:-1], N)
