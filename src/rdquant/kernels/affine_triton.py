"""Fused unpack-dequantize-matmul for affine layers (Triton): y = x @ ((q - z) * s)^T reading only the
packed codes, the fp16 scales and the zero points, never a dense weight.

The artifact packs codes as one bit stream over the row-major [out, in] matrix (docs/FORMAT.md); at load
the layer is repacked (`repack`) into the layout this kernel wants: per output row, int32 words of
`32 // bits` codes along the input dimension (10 codes of 3 bits per word), stored input-major
([words, out], so a tile's loads along the output dimension are contiguous), scales and zero points
(one byte each) likewise [groups, out]. The file on disk never changes. Only torch and triton are imported here, so the
GPU benchmark can load this file alone.

Exactness: the weight is dequantized in fp32 ((q - z) * s, as QuantizedWeight.dequantize does) and cast
to the activation dtype before the dot, accumulated in fp32: the result equals the reference
dequantize-then-matmul in that dtype up to accumulation order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

WIDTHS = (2, 3, 4, 8)  # code widths the kernel takes


def codes_per_word(bits: int) -> int:
    return 32 // bits


@dataclass
class PackedAffine:
    """A layer in the kernel's layout, input-major: words [ceil(in / cpw), out] int32, scales
    [n_groups, out] fp16, zeros [n_groups, out] uint8."""

    words: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    in_features: int

    @property
    def out_features(self) -> int:
        return self.words.shape[1]


def repack(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group_size: int) -> PackedAffine:
    """Codes [out, in] (uint8, already unpacked) into the kernel's words; a symmetric layer gets its
    implicit zero point 2^(bits-1) stored explicitly."""
    if bits not in WIDTHS:
        raise ValueError(f"the triton kernel takes widths {WIDTHS}, not {bits}")
    out_f, in_f = codes.shape
    cpw = codes_per_word(bits)
    n_words = -(-in_f // cpw)
    padded = torch.zeros(out_f, n_words * cpw, dtype=torch.int64, device=codes.device)
    padded[:, :in_f] = codes.to(torch.int64)
    shifts = (torch.arange(cpw, device=codes.device, dtype=torch.int64) * bits)[None, None, :]
    words = (padded.view(out_f, n_words, cpw) << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # same bits as uint32
    if zeros is None:
        zeros = torch.full(scales.shape, 1 << (bits - 1), dtype=torch.uint8, device=codes.device)
    G = in_f if group_size == -1 else group_size
    return PackedAffine(words.t().contiguous(), scales.to(torch.float16).t().contiguous(),
                        zeros.to(torch.uint8).t().contiguous(), bits, G, in_f)


@triton.jit
def _affine_matmul_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr,
                          M, N, K, k_per_split,
                          stride_xm, stride_ym,
                          BITS: tl.constexpr, CPW: tl.constexpr, GROUP: tl.constexpr, SPLIT_K: tl.constexpr,
                          WORD_LOADS: tl.constexpr, SCALE_PER_TILE: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[M, N] (+)= x[M, K-slice] @ W^T. WORD_LOADS (codes per word a power of two): each word is loaded
    once and split into its codes in registers; otherwise each code's word is gathered. BLOCK_M == 1:
    a GEMV (multiply and reduce in fp32, no tensor-core padding); else tl.dot."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_stop, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        if WORD_LOADS:
            rw = k0 // CPW + tl.arange(0, BLOCK_K // CPW)
            words = tl.load(w_ptr + rw[:, None] * N + rn[None, :], mask=(rw[:, None] * CPW < k_stop) & nmask[None, :], other=0)
            shifts = tl.arange(0, CPW) * BITS
            q = tl.reshape((words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1), (BLOCK_K, BLOCK_N))
        else:
            word = tl.load(w_ptr + (rk[:, None] // CPW) * N + rn[None, :], mask=(rk[:, None] < k_stop) & nmask[None, :], other=0)
            q = (word >> ((rk[:, None] % CPW) * BITS)) & ((1 << BITS) - 1)
        if SCALE_PER_TILE:  # the tile lies in one group: one scale and zero point per output
            g = k0 // GROUP
            s = tl.load(s_ptr + g * N + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
            z = tl.load(z_ptr + g * N + rn, mask=nmask, other=0).to(tl.float32)[None, :]
        else:
            g = rk[:, None] // GROUP
            kmask = (rk[:, None] < k_stop) & nmask[None, :]
            s = tl.load(s_ptr + g * N + rn[None, :], mask=kmask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g * N + rn[None, :], mask=kmask, other=0).to(tl.float32)
        w = (q.to(tl.float32) - z) * s  # [BLOCK_K, BLOCK_N], fp32 as QuantizedWeight.dequantize
        if BLOCK_M == 1:
            x = tl.load(x_ptr + rk, mask=rk < k_stop, other=0.0)
            w = w.to(x.dtype).to(tl.float32)  # the weight in the activation dtype, as the reference uses it
            acc += tl.sum(w * x.to(tl.float32)[:, None], axis=0)[None, :]
        else:
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < k_stop), other=0.0)
            acc += tl.dot(x, w.to(x.dtype), out_dtype=tl.float32)
    out = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    omask = (rm[:, None] < M) & nmask[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=omask)
    else:  # partial sums of the K slices meet in an fp32 output
        tl.atomic_add(out, acc, mask=omask)


def affine_matmul(x: torch.Tensor, p: PackedAffine, block_n: int = 128, block_k: int = 128,
                  split_k: int | None = None, num_warps: int = 4, num_stages: int = 3) -> torch.Tensor:
    """x [..., in] @ W^T for the packed layer p: [..., out] in x's dtype. `split_k` slices the input
    dimension over more programs when few output tiles would leave the GPU idle (batch-1 decode);
    default: enough slices for ~2 programs per SM-sized wave of 128, at most 8. The default tile
    (128 x 128, 4 warps) was the fastest most often in bench/speed.py on an H200."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M, K = x2.shape
    N = p.out_features
    block_m = 1 if M == 1 else 16 if M <= 16 else 32 if M <= 32 else 64
    cpw = codes_per_word(p.bits)
    word_loads = cpw & (cpw - 1) == 0 and block_k % cpw == 0
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    if split_k is None:
        split_k = max(1, min(8, 256 // max(tiles, 1), triton.cdiv(K, 4 * block_k)))
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k
    split_k = triton.cdiv(K, k_per_split)
    scale_per_tile = p.group_size % block_k == 0 or p.group_size >= K
    y = torch.empty(M, N, dtype=x.dtype, device=x.device) if split_k == 1 else torch.zeros(M, N, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n), split_k)
    _affine_matmul_kernel[grid](x2, p.words, p.scales, p.zeros, y, M, N, K, k_per_split,
                                x2.stride(0), y.stride(0), BITS=p.bits, CPW=cpw, GROUP=p.group_size,
                                SPLIT_K=split_k, WORD_LOADS=word_loads, SCALE_PER_TILE=scale_per_tile,
                                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
                                num_stages=num_stages)
    return y.to(x.dtype).reshape(*shape[:-1], N)
