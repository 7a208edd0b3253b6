"""4-bit affine layers on the CPU through torch's own int4 kernel (`_weight_int4pack_mm_for_cpu`, the
CPU sibling of tinygemm): codes packed two per byte in torch's tile order, per-group (scale, zero) in
bfloat16, activations multiplied in bfloat16. A layer reads an eighth of its fp32 weight's bytes per
call. torch's zero point is the value of code 8: W = (q - 8) * s + zero, so ours, (q - z) * s, maps to
zero = (8 - z) * s. Exactness: bfloat16 activations and grid values, fp32 accumulation (relative error
~3e-3 against dequantize-then-matmul in fp32)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROUPS = (32, 64, 128, 256)  # group sizes torch's kernel takes


def available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def supports(bits: int, group_size: int, in_features: int, out_features: int) -> bool:
    return bits == 4 and group_size in GROUPS and in_features % group_size == 0 and out_features % 8 == 0


@dataclass
class PackedInt4:
    weight: torch.Tensor  # torch's packed int4 [out, in / 2] uint8
    scale_zero: torch.Tensor  # [n_groups, out, 2] bfloat16
    group_size: int
    out_features: int


def repack(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int) -> PackedInt4:
    """Codes [out, in] (uint8), scales [out, n_groups], zero points (None: symmetric, 8)."""
    s = scales.to(torch.float32)
    z = torch.full_like(s, 8.0) if zeros is None else zeros.to(torch.float32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).cpu(), 8)
    sz = torch.stack([s, (8.0 - z) * s], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return PackedInt4(packed, sz, group_size, codes.shape[0])


def matmul(x: torch.Tensor, p: PackedInt4) -> torch.Tensor:
    """x [..., in] @ W^T in x's dtype (computed in bfloat16)."""
    shape = x.shape
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, shape[-1]).to(torch.bfloat16), p.weight,
                                                     p.group_size, p.scale_zero)
    return y.to(x.dtype).reshape(*shape[:-1], p.out_features)
