"""Fused unpack-dequantize-matmul for affine layers (Triton): y = x @ ((q - z) * s)^T reading only the
packed codes, the fp16 scales and the zero points, never a dense weight.

The artifact packs codes as one bit stream over the row-major [out, in] matrix (docs/FORMAT.md); at load
the layer is repacked (`repack`) into the layout this kernel wants: per output row, int32 words of
`32 // bits` codes along the input dimension (10 codes of 3 bits per word), zero points unpacked to
one byte per group. The file on disk never changes. Only torch and triton are imported here, so the
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
    """A layer in the kernel's layout: words [out, ceil(in / cpw)] int32, scales [out, n_groups] fp16,
    zeros [out, n_groups] uint8."""

    words: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    in_features: int

    @property
    def out_features(self) -> int:
        return self.words.shape[0]


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
    return PackedAffine(words.contiguous(), scales.to(torch.float16).contiguous(), zeros.to(torch.uint8).contiguous(),
                        bits, G, in_f)


@triton.jit
def _affine_matmul_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr,
                          M, N, K, n_words, n_groups,
                          stride_xm, stride_ym,
                          BITS: tl.constexpr, CPW: tl.constexpr, GROUP: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        kmask = (rk[:, None] < K) & (rn[None, :] < N)
        word = tl.load(w_ptr + rn[None, :] * n_words + (rk[:, None] // CPW), mask=kmask, other=0)
        q = (word >> ((rk[:, None] % CPW) * BITS)) & ((1 << BITS) - 1)
        g = rk[:, None] // GROUP
        s = tl.load(s_ptr + rn[None, :] * n_groups + g, mask=kmask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rn[None, :] * n_groups + g, mask=kmask, other=0).to(tl.float32)
        w = ((q.to(tl.float32) - z) * s).to(x.dtype)  # [BLOCK_K, BLOCK_N]
        acc += tl.dot(x, w, out_dtype=tl.float32)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def affine_matmul(x: torch.Tensor, p: PackedAffine, block_n: int = 64, block_k: int = 64) -> torch.Tensor:
    """x [..., in] @ W^T for the packed layer p: [..., out] in x's dtype."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M, K = x2.shape
    N = p.out_features
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _affine_matmul_kernel[grid](x2, p.words, p.scales, p.zeros, y, M, N, K, p.words.shape[1], p.scales.shape[1],
                                x2.stride(0), y.stride(0), BITS=p.bits, CPW=codes_per_word(p.bits), GROUP=p.group_size,
                                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return y.reshape(*shape[:-1], N)
