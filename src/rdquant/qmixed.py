"""The mixed-width group layout (CVXQ cells; docs/FORMAT.md "Mixed-width layers").

A weight W (out x in) is cut into cells: one output row x one group of `group_size` input columns
(the last group may be shorter). Cell (r, g) has its own width widths[r, g] in 0..8 and affine grid:
    W[r, c] = (codes[r, c] - zeros[r, g]) * scales[r, g],   g = c // group_size
A width-0 cell has no codes and no zero point: its one value, the cell's centre, is stored as its
scale (held in memory with zero = -1, so the formula above still gives it). Stored tensors:
`qweight` - codes bit-packed per width (all weights of width-1 cells in row-major order, then width
2, ...), `qwidths` - the widths bit-packed at `width_bits`, `scales` - fp16 [out, n_groups], `qzeros` -
zero points packed per width like the codes (cells in row-major order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import packing
from .qtensor import VariableWidth, dequantize_codes, expand_groups, group_sizes, num_groups

STORED = ("qweight", "qwidths", "scales", "qzeros")


def width_bits(max_width: int) -> int:
    """Bits of the stored width field that holds widths 0..max_width."""
    return max(1, int(max_width).bit_length())


def pack_by_width(values: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """values and widths of one shape -> one uint8 stream: the values of width 1 (row-major), packed
    at 1 bit, then those of width 2, ... (width 0 stores nothing)."""
    parts = [packing.pack(values[widths == b], b) for b in range(1, 9) if bool((widths == b).any())]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8, device=values.device)


def unpack_by_width(stream: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_by_width: uint8 values shaped like `widths` (0 where the width is 0)."""
    out = torch.zeros(widths.shape, dtype=torch.uint8, device=stream.device)
    widths = widths.to(stream.device)
    pos = 0
    for b in range(1, 9):
        mask = widths == b
        n = int(mask.sum())
        if not n:
            continue
        nb = packing.packed_nbytes(n, b)
        if pos + nb > stream.numel():
            raise ValueError("packed stream is shorter than its widths say")
        out[mask] = packing.unpack(stream[pos : pos + nb], b, n)
        pos += nb
    if pos != stream.numel():
        raise ValueError(f"packed stream has {stream.numel()} bytes, its widths say {pos}")
    return out


def stored_bits(widths: torch.Tensor, in_features: int, group_size: int, wbits: int) -> int:
    """Exact bits the layout stores for cells of these widths [out, n_groups] (bias not included)."""
    out_f, n_g = widths.shape
    sizes = group_sizes(in_features, group_size).to(widths.device)
    w = widths.to(torch.long)
    total = 16 * out_f * n_g + 8 * packing.packed_nbytes(out_f * n_g, wbits)
    for b in range(1, 9):
        mask = w == b
        n_cells = int(mask.sum())
        if n_cells:
            n_weights = int((mask * sizes[None, :]).sum())
            total += 8 * (packing.packed_nbytes(n_weights, b) + packing.packed_nbytes(n_cells, b))
    return total


@dataclass
class MixedWeight(VariableWidth):
    """Codes, per-cell widths, fp16 scales and integer zero points (-1 at width-0 cells)."""

    codes: torch.Tensor  # [out, in] uint8
    widths: torch.Tensor  # [out, n_groups] uint8
    scales: torch.Tensor  # [out, n_groups] float16
    zeros: torch.Tensor  # [out, n_groups] float32 integers, -1 at width 0
    group_size: int
    wbits: int = 4  # stored width field

    layout = "mixed"

    def mean_width(self) -> float:
        """Code bits per weight (cell widths weighted by cell size)."""
        out_f, in_f = self.shape
        w = expand_groups(self.widths.to(torch.float32), in_f, self.group_size)
        return float(w.mean())

    def spec(self) -> dict:
        return {"layout": "mixed", "width_bits": self.wbits, "mean_width": round(self.mean_width(), 4)}

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        in_f = self.shape[1]
        scale = expand_groups(self.scales.to(torch.float32), in_f, self.group_size)
        zero = expand_groups(self.zeros.to(torch.float32), in_f, self.group_size)
        return dequantize_codes(self.codes, scale, zero).to(dtype)

    def round_to_grid(self, W: torch.Tensor) -> torch.Tensor:
        """W rounded onto this weight's cell grids (the "before" of error compensation), float32."""
        from .grid import quantize_dequantize

        in_f = self.shape[1]
        cell = lambda t: expand_groups(t.to(W.device, torch.float32), in_f, self.group_size)
        return quantize_dequantize(W, cell(self.scales), cell(self.zeros), cell(self.widths))[1]

    def rows(self, start: int, stop: int) -> "MixedWeight":
        return MixedWeight(self.codes[start:stop], self.widths[start:stop], self.scales[start:stop],
                           self.zeros[start:stop], self.group_size, self.wbits)

    def packed_state(self) -> dict[str, torch.Tensor]:
        in_f = self.shape[1]
        wmap = expand_groups(self.widths, in_f, self.group_size)
        return {
            "qweight": pack_by_width(self.codes, wmap),
            "qwidths": packing.pack(self.widths, self.wbits),
            "scales": self.scales.to(torch.float16).contiguous(),
            "qzeros": pack_by_width(self.zeros.clamp_min(0).to(torch.uint8), self.widths),
        }

    @classmethod
    def from_packed(cls, state: dict[str, torch.Tensor], shape: tuple[int, int], group_size: int,
                    wbits: int) -> "MixedWeight":
        out_f, in_f = shape
        n_g = num_groups(in_f, group_size)
        scales = state["scales"]
        if tuple(scales.shape) != (out_f, n_g):
            raise ValueError(f"scales have shape {tuple(scales.shape)}, expected {(out_f, n_g)}")
        if state["qwidths"].numel() != packing.packed_nbytes(out_f * n_g, wbits):
            raise ValueError("qwidths has the wrong size for this layer")
        widths = packing.unpack(state["qwidths"], wbits, out_f * n_g).view(out_f, n_g)
        if int(widths.max()) > 8:
            raise ValueError("cell widths above 8 bits")
        codes = unpack_by_width(state["qweight"], expand_groups(widths, in_f, group_size))
        zeros = unpack_by_width(state["qzeros"], widths).to(torch.float32)
        zeros = torch.where(widths == 0, -1.0, zeros)
        return cls(codes, widths, scales, zeros, group_size, wbits)
