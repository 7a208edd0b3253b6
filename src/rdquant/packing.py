"""Bit packing of integer codes: 8 codes of width b (1..8) fill exactly b bytes.

Layout (see docs/FORMAT.md): the code tensor is flattened row-major, zero-padded to a multiple of 8
codes, and each run of 8 codes c0..c7 becomes the little-endian integer sum(c_i << (b*i)) written as b
bytes. So 2-bit packs 4 codes per byte, 4-bit 2 per byte, 3-bit 8 codes per 3 bytes, 8-bit is a plain
byte copy. One rule for every width keeps packer and unpacker a few lines each, in torch, on any device.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes needed to pack `numel` codes of width `bits`."""
    return -(-numel // 8) * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) into a 1-D uint8 tensor of packed_nbytes(numel, bits) bytes."""
    _check_bits(bits)
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits}-bit packing")
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    if bits == 8:
        return flat.to(torch.uint8)
    shifts = torch.arange(8, device=flat.device, dtype=torch.int64) * bits
    words = (flat.view(-1, 8) << shifts).sum(dim=1)  # < 2**(8*bits) <= 2**56
    byte_shifts = torch.arange(bits, device=flat.device, dtype=torch.int64) * 8
    return ((words.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of pack: the first `numel` codes, as a 1-D uint8 tensor."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError("packed codes must be a 1-D uint8 tensor")
    if packed.numel() != packed_nbytes(numel, bits):
        raise ValueError(
            f"packed tensor has {packed.numel()} bytes, expected {packed_nbytes(numel, bits)} "
            f"for {numel} codes of {bits} bits"
        )
    if bits == 8:
        return packed[:numel].clone()
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    words = (packed.view(-1, bits).to(torch.int64) << byte_shifts).sum(dim=1)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    codes = (words.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:numel].to(torch.uint8)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bit width {bits} is not packable; use one of {SUPPORTED_BITS}")
