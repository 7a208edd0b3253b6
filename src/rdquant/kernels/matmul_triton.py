"""Fused unpack-dequantize-matmul on the GPU (Triton), reading only packed codes and their grid
parameters, never a dense weight. Two kernels:

- `affine_matmul`: affine groups (qtensor), y = x @ ((q - z) * s)^T, any width 1..8, any group size;
- `segment_matmul`: layouts whose grid is set per input column (column codebooks, CLAQ; CVXQ's
  row-cluster x column cells): the rows are cut into blocks of `block_r` rows of one row set (all rows,
  or one cluster), the columns of each width into chunks of `block_k`, and every (row block, chunk) is
  one program; widths are launched one after the other into one fp32 output.

Repack at load (never on disk): codes are split into bit planes of 8, 4, 2 or 1 bits (3 = 2 + 1,
5 = 4 + 1, 6 = 4 + 2, 7 = 4 + 2 + 1), each packed `32 // plane` codes to an int32 word along the input
dimension and stored input-major, so a tile's words load contiguously and every code is cut out with a
shift and a mask. Codes become fp32 without a conversion instruction: (q | 0x4B000000) read as fp32 is
2^23 + q. Affine tiles that lie in one group factor the grid out of the dot,
s * (sum(q * x) - z * sum(x)); codebooks look their entries up per code.

Exactness: the products are formed in fp32 from the same fp32 values the reference dequantizes to, so
results equal dequantize-then-matmul up to fp32 summation order (GEMV); the tensor-core path (batch > 1)
feeds the exact integer codes (affine, one group per tile) or the weight rounded to the activation dtype,
as the reference does. Only torch and triton are imported, so the GPU benchmark loads this file alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAGIC = 0x4B000000  # fp32 bits of 2^23: OR-ing a code < 2^23 into the mantissa gives 2^23 + code
PAD_K = 256  # affine: the input dimension is padded (zero codes) to a multiple of the largest tile
SEGMENT_TILE = (128, 128)  # column-grid layers: (rows, columns) of one program's item
SMALL_LAYER = 1 << 20  # affine layers of at most this many weights take narrow tiles at batch 1


def planes(bits: int) -> tuple[int, ...]:
    """The bit planes a width is stored in, low bits first (3 -> (2, 1): q = p0 | p1 << 2)."""
    if not 0 <= bits <= 8:
        raise ValueError(f"widths 0..8 only, not {bits}")
    return tuple(p for p in (8, 4, 2, 1) if bits & p)


def pack_planes(codes: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """codes [..., K, R] (K a multiple of 32) -> one int32 tensor [..., K * p / 32, R] per plane p:
    word w of column r holds codes w * (32 // p) + i at bit i * p."""
    out, shift = [], 0
    c = codes.to(torch.int32)
    K = codes.shape[-2]
    for p in planes(bits):
        cpw = 32 // p
        v = ((c >> shift) & ((1 << p) - 1)).reshape(*codes.shape[:-2], K // cpw, cpw, codes.shape[-1])
        words = torch.zeros(v.shape[:-2] + v.shape[-1:], dtype=torch.int64, device=codes.device)
        for i in range(cpw):
            words |= v[..., i, :].to(torch.int64) << (i * p)
        out.append(torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous())
        shift += p
    return out


def _plane_args(ps: list[torch.Tensor], bits: int) -> tuple[list[torch.Tensor], tuple[int, int, int]]:
    """Three plane pointers (absent ones repeat the first) and their widths (0 = absent)."""
    widths = planes(bits) if bits else ()
    ptrs = list(ps) + [ps[0] if ps else None] * (3 - len(ps))
    return ptrs, tuple(widths) + (0,) * (3 - len(widths))  # type: ignore[return-value]


@triton.jit
def _plane(ptr, w0, rn, stride, nmask, BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """[BLOCK_K, BLOCK_N] codes of one plane: words w0 .. w0 + BLOCK_K / (32 // BITS) along the input."""
    rw = w0 + tl.arange(0, BLOCK_K // (32 // BITS))
    words = tl.load(ptr + rw[:, None] * stride + rn[None, :], mask=nmask[None, :], other=0)
    shifts = tl.arange(0, 32 // BITS) * BITS
    return tl.reshape((words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1), (BLOCK_K, BLOCK_N))


@triton.jit
def _codes(p0, p1, p2, k0, rn, stride, nmask, B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr,
           BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """The int32 codes of input rows k0 .. k0 + BLOCK_K (0 where no plane is stored: width 0)."""
    if B0 > 0:
        q = _plane(p0, k0 // (32 // B0), rn, stride, nmask, B0, BLOCK_K, BLOCK_N)
        if B1 > 0:
            q = q | (_plane(p1, k0 // (32 // B1), rn, stride, nmask, B1, BLOCK_K, BLOCK_N) << B0)
        if B2 > 0:
            q = q | (_plane(p2, k0 // (32 // B2), rn, stride, nmask, B2, BLOCK_K, BLOCK_N) << (B0 + B1))
    else:
        q = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.int32)
    return q


@triton.jit
def _exact_f32(q):
    """Codes (< 2^23) as fp32 without a conversion instruction: 2^23 + q, then minus 2^23."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _affine_kernel(x_ptr, p0, p1, p2, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, k_per_split, n_split,
                   stride_xm, stride_ym,
                   B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr, GROUP: tl.constexpr,
                   SPLIT: tl.constexpr, SCALE_PER_TILE: tl.constexpr, F16_MAGIC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[M, N] = x[M, K] @ W^T, the input cut into n_split slices. BLOCK_M == 1: one activation row per
    program (GEMV: multiply and reduce in fp32); else tl.dot on BLOCK_M rows; slices sum in `_finish`."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k_start = pid_k * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, K)
    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_stop, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk < k_stop
        q = _codes(p0, p1, p2, k0, rn, N, nmask, B0, B1, B2, BLOCK_K, BLOCK_N)
        qf = _exact_f32(q)
        if SCALE_PER_TILE:  # the tile lies in one group: one scale and zero point per output
            g = k0 // GROUP
            s = tl.load(s_ptr + g * N + rn, mask=nmask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g * N + rn, mask=nmask, other=0).to(tl.float32)
            if BLOCK_M == 1:
                x = tl.load(x_ptr + pid_m * stride_xm + rk, mask=kmask, other=0.0).to(tl.float32)
                acc += s * (tl.sum(qf * x[:, None], axis=0) - z * tl.sum(x, axis=0))
            else:
                x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & kmask[None, :], other=0.0)
                if F16_MAGIC:  # fp16 activations: codes as fp16 without a conversion (1024 + q, minus 1024)
                    qh = (q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1024.0
                    d = tl.dot(x, qh.to(tl.float16), out_dtype=tl.float32)
                else:
                    d = tl.dot(x, qf.to(x.dtype), out_dtype=tl.float32)  # codes are exact in fp16 / bf16
                xs = tl.sum(x.to(tl.float32), axis=1)
                acc += s[None, :] * (d - xs[:, None] * z[None, :])
        else:
            g = rk[:, None] // GROUP
            m2 = kmask[:, None] & nmask[None, :]
            s2 = tl.load(s_ptr + g * N + rn[None, :], mask=m2, other=0.0).to(tl.float32)
            z2 = tl.load(z_ptr + g * N + rn[None, :], mask=m2, other=0).to(tl.float32)
            w = (qf - z2) * s2
            if BLOCK_M == 1:
                x = tl.load(x_ptr + pid_m * stride_xm + rk, mask=kmask, other=0.0).to(tl.float32)
                acc += tl.sum(w * x[:, None], axis=0)
            else:
                x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & kmask[None, :], other=0.0)
                acc += tl.dot(x, w.to(x.dtype), out_dtype=tl.float32)
    _finish(acc, y_ptr, ws_ptr, cnt_ptr, pid_m, pid_n, pid_k, rm, rn, nmask, M, N, n_split, stride_ym, SPLIT, BLOCK_M)


@triton.jit
def _finish(acc, y_ptr, ws_ptr, cnt_ptr, pid_m, pid_n, pid_k, rm, rn, nmask, M, N, n_split, stride_ym,
            SPLIT: tl.constexpr, BLOCK_M: tl.constexpr):
    """Write a program's fp32 sums to y; with SPLIT, leave them in the workspace, and the last slice of
    the tile to finish (a per-tile counter, which it resets for the next call) adds them up and writes y:
    one kernel, nothing to clear or cast."""
    if BLOCK_M == 1:
        idx = pid_m * N + rn
        out = y_ptr + pid_m * stride_ym + rn
        omask = nmask
    else:
        idx = rm[:, None] * N + rn[None, :]
        out = y_ptr + rm[:, None] * stride_ym + rn[None, :]
        omask = (rm[:, None] < M) & nmask[None, :]
    if SPLIT:
        tl.store(ws_ptr + pid_k * M * N + idx, acc, mask=omask)
        tile = pid_m * tl.num_programs(1) + pid_n
        done = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")  # orders the store above before the count
        if done == n_split - 1:  # the last slice of this tile: sum the partials, reset the counter
            total = tl.zeros(acc.shape, dtype=tl.float32)
            for j in range(0, n_split):
                total += tl.load(ws_ptr + j * M * N + idx, mask=omask, other=0.0, cache_modifier=".cg")
            tl.store(out, total.to(y_ptr.dtype.element_ty), mask=omask)
            tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed")
    else:
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=omask)


class SplitCounters:
    """A packed layer's split-K tile counters (zero between calls: each call's last programs reset them)."""

    def counters(self, n: int, device: torch.device) -> torch.Tensor:
        c = getattr(self, "_counters", None)
        if c is None or c.numel() < n:
            c = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
            self._counters = c
        return c


def split_plan(K: int, block_k: int, tiles: int, split_k: int | None = None) -> tuple[int, int]:
    """(slices, columns per slice) of the input: by default ~1,500 programs, each at least two tiles deep."""
    if split_k is None:
        split_k = max(1, min(16, 1536 // max(tiles, 1), triton.cdiv(K, 2 * block_k)))
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k
    return triton.cdiv(K, k_per_split), k_per_split


@dataclass
class PackedAffine(SplitCounters):
    """An affine layer in the kernel's layout: bit planes [K_pad * p / 32, out] int32 (input-major),
    scales [n_groups, out] fp16, zero points [n_groups, out] uint8 (symmetric: 2^(bits-1) stored)."""

    planes: list[torch.Tensor]
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    in_features: int
    out_features: int

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.planes, self.scales, self.zeros))


def repack_affine(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                  group_size: int) -> PackedAffine:
    """Codes [out, in] (uint8, unpacked), scales [out, n_groups], zero points (None: symmetric) into the
    kernel's planes; the input dimension is padded with zero codes to a multiple of PAD_K."""
    if not 1 <= bits <= 8:
        raise ValueError(f"the affine kernel takes widths 1..8, not {bits}")
    out_f, in_f = codes.shape
    k_pad = -(-in_f // PAD_K) * PAD_K
    t = torch.zeros(k_pad, out_f, dtype=torch.uint8, device=codes.device)
    t[:in_f] = codes.t()
    if zeros is None:
        zeros = torch.full(scales.shape, 1 << (bits - 1), dtype=torch.uint8, device=codes.device)
    G = in_f if group_size == -1 else group_size
    return PackedAffine(pack_planes(t, bits), scales.to(torch.float16).t().contiguous(),
                        zeros.to(torch.uint8).t().contiguous(), bits, G, in_f, out_f)


def as_rows(x: torch.Tensor, in_features: int) -> torch.Tensor:
    """x [..., in] as contiguous-row [M, in] activations for a kernel (a one-line error on a wrong width)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if x2.shape[1] != in_features:
        raise ValueError(f"x has {x2.shape[1]} features, the layer takes {in_features}")
    return x2


def _pow2_divisor(n: int, cap: int) -> int:
    p = 1
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p


def affine_matmul(x: torch.Tensor, p: PackedAffine, block_n: int | None = None, block_k: int | None = None,
                  split_k: int | None = None, num_warps: int | None = None, num_stages: int = 2,
                  f16_magic: bool = False) -> torch.Tensor:
    """x [..., in] @ W^T for the packed layer p: [..., out] in x's dtype. Tiles of one group factor the
    grid out of the dot (block_k defaults to the largest power of two <= 128 dividing the group size,
    at least 32). `split_k` slices the input over more programs when few output tiles would leave the
    GPU idle (decode); default: ~1,500 programs (~11 per SM of an H200). Defaults
    are bench/speed.py's fastest configurations on an H200."""
    shape, x2 = x.shape, as_rows(x, p.in_features)
    M, K = x2.shape
    N = p.out_features
    gemv = M < 8  # a few rows: one program per row, each a GEMV
    block_m = 1 if gemv else 16 if M <= 16 else 32 if M <= 32 else 64
    if block_k is None:
        block_k = max(32, _pow2_divisor(p.group_size, 128)) if p.group_size < K else 128
    if block_n is None:  # small layers: narrow tiles, more programs (they are latency-bound)
        block_n = 32 if N * K <= SMALL_LAYER and gemv else 128
    if num_warps is None:
        num_warps = 2 if gemv else 4
    group = p.group_size if p.group_size < K else 1 << 30  # one group: every tile is in it
    scale_per_tile = group % block_k == 0
    rows = M if gemv else triton.cdiv(M, block_m)
    tiles = rows * triton.cdiv(N, block_n)
    split_k, k_per_split = split_plan(K, block_k, tiles, split_k)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    ws = torch.empty(split_k * M * N if split_k > 1 else 1, dtype=torch.float32, device=x.device)
    (q0, q1, q2), (b0, b1, b2) = _plane_args(p.planes, p.bits)
    grid = (rows, triton.cdiv(N, block_n), split_k)
    _affine_kernel[grid](x2, q0, q1, q2, p.scales, p.zeros, y, ws, p.counters(tiles, x.device), M, N, K, k_per_split,
                         split_k, x2.stride(0), y.stride(0),
                         B0=b0, B1=b1, B2=b2, GROUP=group, SPLIT=split_k > 1, SCALE_PER_TILE=scale_per_tile,
                         F16_MAGIC=f16_magic and x.dtype == torch.float16,
                         BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)
    return y.reshape(*shape[:-1], N)


# --- column-grid layouts: codebooks and row-cluster x column cells ---------------------------------

@triton.jit
def _segment_kernel(x_ptr, p0, p1, p2, items_ptr, rows_ptr, cols_ptr, s_ptr, z_ptr, t_ptr, off_ptr, rs_ptr, y_ptr,
                    M, stride_xm, stride_ym,
                    B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr, LOOKUP: tl.constexpr, ROW_SCALE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """One (row block, column chunk) item of one width: y[:, rows] += x[:, cols] @ W[rows, cols]^T.
    LOOKUP: W = table[off[c] + q] (* row scale); else W = (q - z[c]) * s[c]."""
    item = tl.program_id(0)
    pid_m = tl.program_id(1)
    rb = tl.load(items_ptr + 2 * item)
    ch = tl.load(items_ptr + 2 * item + 1)
    rr = tl.arange(0, BLOCK_R)
    rows = tl.load(rows_ptr + rb * BLOCK_R + rr)
    rmask = rows >= 0
    kk = tl.arange(0, BLOCK_K)
    cols = tl.load(cols_ptr + ch * BLOCK_K + kk).to(tl.int32)
    cmask = cols >= 0
    words = (BLOCK_K // 32) * BLOCK_R  # words of a 1-bit plane per item
    q = _codes(p0 + item * words * B0, p1 + item * words * B1, p2 + item * words * B2, 0, rr, BLOCK_R,
               rr < BLOCK_R, B0, B1, B2, BLOCK_K, BLOCK_R)
    if LOOKUP:  # each column's 2^BITS entries in registers, looked up per code
        off = tl.load(off_ptr + cols, mask=cmask, other=0)
        ent = tl.arange(0, 1 << (B0 + B1 + B2))
        tab = tl.load(t_ptr + off[:, None] + ent[None, :], mask=cmask[:, None], other=0.0)
    else:
        qf = _exact_f32(q)
        s = tl.load(s_ptr + ch * BLOCK_K + kk).to(tl.float32)
        z = tl.load(z_ptr + ch * BLOCK_K + kk).to(tl.float32)
    if BLOCK_M == 1:
        x = tl.load(x_ptr + pid_m * stride_xm + cols, mask=cmask, other=0.0).to(tl.float32)
        if LOOKUP:  # x folded into the entries: one lookup and one add per code
            acc = tl.sum(tl.gather(tab * x[:, None], q, axis=1), axis=0)
        else:
            xs = x * s
            acc = tl.sum(qf * xs[:, None], axis=0) - tl.sum(xs * z, axis=0)
        if ROW_SCALE:
            acc = acc * tl.load(rs_ptr + rows, mask=rmask, other=0.0)
        tl.atomic_add(y_ptr + pid_m * stride_ym + rows, acc, mask=rmask, sem="relaxed")
    else:
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + cols[None, :], mask=(rm[:, None] < M) & cmask[None, :], other=0.0)
        if LOOKUP:
            w = tl.gather(tab, q, axis=1)
        else:
            w = (qf - z[:, None]) * s[:, None]
        acc = tl.dot(x, w.to(x.dtype), out_dtype=tl.float32)
        if ROW_SCALE:
            acc = acc * tl.load(rs_ptr + rows, mask=rmask, other=0.0)[None, :]
        tl.atomic_add(y_ptr + rm[:, None] * stride_ym + rows[None, :], acc, mask=(rm[:, None] < M) & rmask[None, :],
                      sem="relaxed")


@dataclass
class SegmentLaunch:
    """The items of one width: planes [n_items * words, ...] int32, items [n_items, 2] (row block, chunk),
    chunk columns [n_chunks, block_k] (-1: padding), and per chunk column s (fp16) and z (int16)."""

    bits: int
    planes: list[torch.Tensor]
    items: torch.Tensor
    cols: torch.Tensor
    s: torch.Tensor | None = None
    z: torch.Tensor | None = None


@dataclass
class PackedSegments:
    """A column-grid layer in the kernel's layout (see segment_matmul)."""

    launches: list[SegmentLaunch]
    rows: torch.Tensor  # [n_row_blocks, block_r] int32, -1: padding
    out_features: int
    in_features: int
    block_r: int
    block_k: int
    table: torch.Tensor | None = None  # codebooks: fp32 entries end to end
    offsets: torch.Tensor | None = None  # [in] int32: each column's first entry in `table`
    row_scale: torch.Tensor | None = None  # [out] fp32
    outliers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # rows, cols, W - grid value

    def nbytes(self) -> int:
        ts = [self.rows, self.table, self.offsets, self.row_scale, *(self.outliers or ())]
        for L in self.launches:
            ts += [*L.planes, L.items, L.cols, L.s, L.z]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _ranks(keys: torch.Tensor, n_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For sorted keys: each entry's rank among its key's entries, and each key's count."""
    counts = torch.bincount(keys, minlength=n_keys)
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(keys.numel(), device=keys.device) - starts[keys], counts


def repack_segments(codes: torch.Tensor, row_sets: torch.Tensor | None, widths: torch.Tensor,
                    scales: torch.Tensor | None = None, zeros: torch.Tensor | None = None, *,
                    block_r: int | None = None, block_k: int | None = None, item_batch: int = 4096) -> PackedSegments:
    """codes [out, in] uint8; row_sets [out] (each row's set, None: one set) and widths [n_sets, in]
    (each set's column widths); affine cells: scales and zero points [n_sets, in] (zero -1 at width 0).
    Codebooks set `table`, `offsets`, `row_scale`, `outliers` on the result. Tiles: SEGMENT_TILE."""
    dev = codes.device
    out_f, in_f = codes.shape
    block_r, block_k = block_r or SEGMENT_TILE[0], block_k or SEGMENT_TILE[1]
    if block_k % 32 or block_r % 16:
        raise ValueError("block_k must be a multiple of 32 and block_r of 16")
    sets = torch.zeros(out_f, dtype=torch.long, device=dev) if row_sets is None else row_sets.to(dev, torch.long)
    n_sets = widths.shape[0]
    order = torch.sort(sets, stable=True).indices
    rank, n_rows = _ranks(sets[order], n_sets)
    n_rb = -(-n_rows // block_r)
    rb_start = torch.cumsum(n_rb, 0) - n_rb
    rows = torch.full((int(n_rb.sum()), block_r), -1, dtype=torch.int32, device=dev)
    rows[rb_start[sets[order]] + rank // block_r, rank % block_r] = order.to(torch.int32)
    launches = []
    widths = widths.to(dev, torch.long)
    col_dtype = torch.int16 if in_f < 2**15 else torch.int32
    for b in range(9):
        k, c = (widths == b).nonzero(as_tuple=True)
        if not k.numel():
            continue
        rank, cnt = _ranks(k, n_sets)
        n_ch = -(-cnt // block_k)
        ch_start = torch.cumsum(n_ch, 0) - n_ch
        chunk = ch_start[k] + rank // block_k
        n_chunks = int(n_ch.sum())
        cols = torch.full((n_chunks, block_k), -1, dtype=torch.long, device=dev)
        cols[chunk, rank % block_k] = c
        L = SegmentLaunch(b, [], torch.empty(0), cols.to(col_dtype))
        if scales is not None:
            L.s = torch.zeros(n_chunks, block_k, dtype=torch.float16, device=dev)
            L.z = torch.zeros(n_chunks, block_k, dtype=torch.int16, device=dev)
            L.s[chunk, rank % block_k] = scales.to(dev)[k, c].to(torch.float16)
            L.z[chunk, rank % block_k] = zeros.to(dev)[k, c].to(torch.int16)
        chunk_set = torch.repeat_interleave(torch.arange(n_sets, device=dev), n_ch)
        reps = n_rb[chunk_set]
        item_chunk = torch.repeat_interleave(torch.arange(n_chunks, device=dev), reps)
        first = torch.cumsum(reps, 0) - reps
        item_rb = rb_start[chunk_set][item_chunk] + torch.arange(item_chunk.numel(), device=dev) - first[item_chunk]
        L.items = torch.stack([item_rb, item_chunk], 1).to(torch.int32).contiguous()
        if b:
            parts: list[list[torch.Tensor]] = []
            for i0 in range(0, item_chunk.numel(), item_batch):  # bounded temporaries on large layers
                r = rows[item_rb[i0 : i0 + item_batch]].to(torch.long)
                cc = cols[item_chunk[i0 : i0 + item_batch]]
                v = codes[r.clamp_min(0)[:, None, :], cc.clamp_min(0)[:, :, None]]  # [items, block_k, block_r]
                v = torch.where((r[:, None, :] >= 0) & (cc[:, :, None] >= 0), v, 0)
                parts.append(pack_planes(v, b))
            L.planes = [torch.cat([p[j] for p in parts]).reshape(-1) for j in range(len(parts[0]))]
        launches.append(L)
    return PackedSegments(launches, rows, out_f, in_f, block_r, block_k)


def segment_matmul(x: torch.Tensor, p: PackedSegments, block_m: int | None = None, num_warps: int = 4) -> torch.Tensor:
    """x [..., in] @ W^T for a column-grid layer: one launch per width into an fp32 output, then the
    outliers' corrections, cast to x's dtype."""
    shape, x2 = x.shape, as_rows(x, p.in_features)
    M, K = x2.shape
    gemv = M < 8
    bm = 1 if gemv else (block_m or (16 if M <= 16 else 32 if M <= 32 else 64))
    y = torch.zeros(M, p.out_features, dtype=torch.float32, device=x.device)
    lookup = p.table is not None
    dummy = p.rows
    for L in p.launches:
        (q0, q1, q2), (b0, b1, b2) = _plane_args(L.planes, L.bits) if L.bits else ([dummy] * 3, (0, 0, 0))
        grid = (L.items.shape[0], M if gemv else triton.cdiv(M, bm))
        _segment_kernel[grid](x2, q0, q1, q2, L.items, p.rows, L.cols,
                              dummy if L.s is None else L.s, dummy if L.z is None else L.z,
                              dummy if p.table is None else p.table, dummy if p.offsets is None else p.offsets,
                              dummy if p.row_scale is None else p.row_scale, y, M, x2.stride(0), y.stride(0),
                              B0=b0, B1=b1, B2=b2, LOOKUP=lookup, ROW_SCALE=p.row_scale is not None,
                              BLOCK_M=bm, BLOCK_R=p.block_r, BLOCK_K=p.block_k, num_warps=num_warps)
    if p.outliers is not None:
        r, c, d = p.outliers
        y.index_add_(1, r, x2[:, c].to(torch.float32) * d)
    return y.to(x.dtype).reshape(*shape[:-1], p.out_features)
