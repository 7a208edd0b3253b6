"""The quantized-weight layout shared by the algorithms, the artifact and the runtime.

A weight W (out x in) is stored as integer codes on a per-group affine grid:
    W[r, c] ~= (codes[r, c] - zeros[r, g]) * scales[r, g],   g = c // group_size
Groups run along the input dimension; the last group may be shorter (ragged). Scales are fp16; zero
points are integers in [0, 2**bits) (bit-packed like the codes); symmetric grids use the constant zero
2**(bits-1) and store none. This module never imports the algorithms.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from . import packing


def num_groups(in_features: int, group_size: int) -> int:
    """Number of groups along the input dimension (-1 means one group per row)."""
    return 1 if group_size == -1 else -(-in_features // group_size)


def group_sizes(in_features: int, group_size: int) -> torch.Tensor:
    """Columns in each group [n_groups] (long); the last group may be shorter (ragged)."""
    g = in_features if group_size == -1 else group_size
    n_g = num_groups(in_features, group_size)
    sizes = torch.full((n_g,), g, dtype=torch.long)
    sizes[-1] = in_features - g * (n_g - 1)
    return sizes


def expand_groups(t: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """Broadcast per-group values [out, n_groups] to per-column [out, in] (ragged last group)."""
    if group_size == -1:
        return t.expand(t.shape[0], in_features)
    return t.repeat_interleave(group_size, dim=1)[:, :in_features]


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The one dequantization formula, (code - zero) * scale in float32; inputs broadcast."""
    return (codes.to(torch.float32) - zero.to(torch.float32)) * scale.to(torch.float32)


def dequantize_grouped(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """dequantize_codes on per-group scales and zero points [out, n_groups] (ragged last group), in
    float32, in place on one converted copy of the codes: the same values as expanding the groups
    first, ~30x faster on a CPU (no [out, in] scale and zero tensors)."""
    out_f, in_f = codes.shape
    G = in_f if group_size == -1 else group_size
    n_full, s, z = in_f // G, scales.to(torch.float32), zeros.to(torch.float32)
    w = codes.to(torch.float32, memory_format=torch.contiguous_format)  # as_strided below needs row-major
    if n_full:
        full = w.as_strided((out_f, n_full, G), (w.stride(0), G, 1))
        full.sub_(z[:, :n_full, None]).mul_(s[:, :n_full, None])
    if n_full * G < in_f:
        w[:, n_full * G:].sub_(z[:, n_full:]).mul_(s[:, n_full:])
    return w


def laplace_levels(bits: int) -> torch.Tensor:
    """The companded grid's 2**bits levels at a width (CVXQ's Laplace-shaped grid, before the cell's
    scale): the quantiles (k + 1/2) / 2**bits of the unit Laplace distribution, float32, ascending.
    Width 0 has the one level 1 (the cell's centre is held as its scale)."""
    if bits == 0:
        return torch.ones(1)
    u = (torch.arange(1 << bits, dtype=torch.float64) + 0.5) / (1 << bits)
    return torch.where(u < 0.5, torch.log(2 * u), -torch.log(2 * (1 - u))).to(torch.float32)


def level_table(device: torch.device | str | None = None) -> torch.Tensor:
    """[9, 256] levels of the companded grid at widths 0..8 (row b holds laplace_levels(b), then 0)."""
    return _level_table(str(torch.device(device or "cpu")))


@functools.lru_cache(maxsize=None)
def _level_table(device: str) -> torch.Tensor:
    table = torch.zeros(9, 256)
    for b in range(9):
        table[b, : 1 << b] = laplace_levels(b)
    return table.to(device)


def dequantize_levels(codes: torch.Tensor, widths: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Companded-grid values scale * level[width][code] in float32 (codes, widths, scale broadcast)."""
    table = level_table(codes.device)
    codes, widths = torch.broadcast_tensors(codes.to(torch.long), widths.to(codes.device, torch.long))
    return table[widths, codes] * scale.to(torch.float32)


class VariableWidth:
    """What the layouts with a width per column or cell share: `codes` [out, in] and `widths`."""

    codes: torch.Tensor
    widths: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def bits(self) -> int:
        """The widest code."""
        return int(self.widths.max()) if self.widths.numel() else 0

    @property
    def symmetric(self) -> bool:
        return False


def grid_buffers(out_features: int, in_features: int, bits: int, group_size: int, symmetric: bool
                 ) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """The stored tensors of a per-group affine grid: fp16 `scales` and (asymmetric) packed `qzeros`."""
    n_g = num_groups(in_features, group_size)
    out = {"scales": (torch.float16, (out_features, n_g))}
    if not symmetric:
        out["qzeros"] = (torch.uint8, (packing.packed_nbytes(out_features * n_g, bits),))
    return out


def unpack_grid(state: dict[str, torch.Tensor], out_features: int, in_features: int, bits: int,
                group_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scales, zero points or None) of a per-group affine grid from its stored tensors (shape checked)."""
    n_g = num_groups(in_features, group_size)
    scales = state["scales"]
    if tuple(scales.shape) != (out_features, n_g):
        raise ValueError(f"scales have shape {tuple(scales.shape)}, expected {(out_features, n_g)}")
    zeros = None
    if "qzeros" in state:
        zeros = packing.unpack(state["qzeros"], bits, out_features * n_g).view(out_features, n_g)
    return scales, zeros


class GroupGrid:
    """What the weights on per-group affine grids share (`scales`, `zeros` or None, `bits`): symmetry and
    the zero points, the constant 2**(bits-1) when symmetric."""

    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    def zero_points(self) -> torch.Tensor:
        if self.zeros is not None:
            return self.zeros
        return torch.full_like(self.scales, float(1 << (self.bits - 1)), dtype=torch.float32)


@dataclass
class QuantizedWeight(GroupGrid):
    """Codes, fp16 scales and integer zero points of one linear layer's weight."""

    layout = "affine"  # layouts.Affine

    codes: torch.Tensor  # [out, in] uint8
    scales: torch.Tensor  # [out, n_groups] float16
    zeros: torch.Tensor | None  # [out, n_groups] uint8, None when symmetric
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_grouped(self.codes, self.scales, self.zero_points(), self.group_size).to(dtype)

    def spec(self) -> None:
        """Affine layers need no layout fields in the manifest beyond bits, group size and symmetry."""
        return None

    def round_to_grid(self, W: torch.Tensor) -> torch.Tensor:
        """W rounded to nearest on this weight's grids (same scales and zero points), dequantized: plain
        rounding, the 'before' of a method's error compensation."""
        from .grid import quantize

        in_f = self.shape[1]
        S = expand_groups(self.scales.float(), in_f, self.group_size)
        Z = expand_groups(self.zero_points().float(), in_f, self.group_size)
        return dequantize_codes(quantize(W, S, Z, self.bits), S, Z)

    def rows(self, start: int, stop: int) -> "QuantizedWeight":
        """The sub-weight of output rows [start, stop) (splits jointly quantized matrices)."""
        zeros = None if self.zeros is None else self.zeros[start:stop]
        return QuantizedWeight(
            self.codes[start:stop], self.scales[start:stop], zeros, self.bits, self.group_size
        )

    # --- packed form, as stored in the artifact ---------------------------------------------
    def packed_state(self) -> dict[str, torch.Tensor]:
        """Tensors written to the artifact: qweight (packed codes), scales, qzeros (packed, asym)."""
        state = {
            "qweight": packing.pack(self.codes, self.bits),
            "scales": self.scales.to(torch.float16).contiguous(),
        }
        if self.zeros is not None:
            state["qzeros"] = packing.pack(self.zeros, self.bits)
        return state

    @classmethod
    def from_packed(
        cls,
        state: dict[str, torch.Tensor],
        shape: tuple[int, int],
        bits: int,
        group_size: int,
    ) -> "QuantizedWeight":
        out_f, in_f = shape
        codes = packing.unpack(state["qweight"], bits, out_f * in_f).view(out_f, in_f)
        scales, zeros = unpack_grid(state, out_f, in_f, bits, group_size)
        return cls(codes=codes, scales=scales, zeros=zeros, bits=bits, group_size=group_size)
