"""Bit packing of integer codes: 8 codes of width b (1..8) fill exactly b bytes.

Layout (see docs/FORMAT.md): the code tensor is flattened row-major, zero-padded to a multiple of 8
codes, and each run of 8 codes c0..c7 becomes the little-endian integer sum(c_i << (b*i)) written as b
bytes. So 2-bit packs 4 codes per byte, 4-bit 2 per byte, 3-bit 8 codes per 3 bytes, 8-bit is a plain
byte copy. One rule for every width keeps packer and unpacker a few lines each, in torch, on any device
(small CPU tensors unpack through numpy, where torch's per-op overhead would dominate).
"""

from __future__ import annotations

import numpy as np
import torch

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)
_SMALL_RUNS = 16384  # unpack: below this many 8-code runs, the one-integer-per-run path is faster
_NUMPY_CODES = 65536  # unpack: up to this many codes on CPU, numpy (no per-op dispatch) is faster


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes needed to pack `numel` codes of width `bits`."""
    return -(-numel // 8) * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) into a 1-D uint8 tensor of packed_nbytes(numel, bits) bytes."""
    _check_bits(bits)
    flat = codes.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits}-bit packing")
    flat = flat.to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    if bits == 8:
        return flat
    if 8 % bits == 0:  # whole codes per byte: byte = sum_i c_i << (bits * i), i < 8 / bits
        per = 8 // bits
        lanes = flat.view(-1, per)
        out = lanes[:, 0].clone()
        for i in range(1, per):
            out |= lanes[:, i] << (bits * i)
        return out
    # code i occupies bits [bits*i, bits*i + bits) of the run: its low part goes to byte
    # (bits*i) // 8 and, when it straddles a byte boundary, its high part to the next byte
    lanes = flat.view(-1, 8)
    out = torch.zeros(lanes.shape[0], bits, dtype=torch.uint8, device=flat.device)
    for i in range(8):
        j, shift = divmod(bits * i, 8)
        out[:, j] |= lanes[:, i] << shift
        if shift + bits > 8:
            out[:, j + 1] |= lanes[:, i] >> (8 - shift)
    return out.reshape(-1)


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
    if packed.device.type == "cpu" and numel <= _NUMPY_CODES:
        return torch.from_numpy(_unpack_numpy(packed.numpy(), bits, numel))
    mask = (1 << bits) - 1
    if 8 % bits == 0:  # each lane written in place (a third faster than stacking shifted copies)
        per = 8 // bits
        codes = torch.empty(packed.numel(), per, dtype=torch.uint8, device=packed.device)
        for i in range(per):
            torch.bitwise_and(packed >> (bits * i) if i else packed, mask, out=codes[:, i])
        return codes.view(-1)[:numel]
    lanes = packed.view(-1, bits)
    if lanes.shape[0] <= _SMALL_RUNS:  # few runs: each run as one integer, all 8 codes shifted out at once
        # (fewer tensor calls; at large sizes the int64 temporaries cost more than the byte lanes below)
        run = lanes[:, 0].to(torch.int64)
        for j in range(1, bits):
            run |= lanes[:, j].to(torch.int64) << (8 * j)
        shifts = torch.arange(0, 8 * bits, bits, device=packed.device)
        return ((run[:, None] >> shifts) & mask).to(torch.uint8).reshape(-1)[:numel]
    codes = torch.empty(lanes.shape[0], 8, dtype=torch.uint8, device=packed.device)
    for i in range(8):
        j, shift = divmod(bits * i, 8)
        c = lanes[:, j] >> shift
        if shift + bits > 8:
            c = c | (lanes[:, j + 1] << (8 - shift))
        codes[:, i] = c & mask
    return codes.reshape(-1)[:numel]


def _unpack_numpy(packed: np.ndarray, bits: int, numel: int) -> np.ndarray:
    """unpack for small CPU tensors (side information: zero points, widths) in numpy: a few
    microseconds where torch's per-op overhead is tens, and no torch calls from the loader's threads."""
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        per = 8 // bits
        codes = np.empty((packed.size, per), dtype=np.uint8)
        for i in range(per):
            np.right_shift(packed, np.uint8(bits * i), out=codes[:, i])
        codes &= np.uint8(mask)
        return codes.reshape(-1)[:numel]
    lanes = packed.reshape(-1, bits)
    dt = np.uint32 if bits <= 4 else np.uint64  # a run of 8 codes is 8 * bits bits
    run = lanes[:, 0].astype(dt)
    for j in range(1, bits):
        run |= lanes[:, j].astype(dt) << dt(8 * j)
    codes = (run[:, None] >> np.arange(0, 8 * bits, bits, dtype=dt)) & dt(mask)
    return codes.astype(np.uint8).reshape(-1)[:numel]


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bit width {bits} is not packable; use one of {SUPPORTED_BITS}")
