"""The mixed-width layout (CVXQ cells; docs/FORMAT.md "Mixed-width layers").

A weight W (out x in) is cut into cells, each with its own width in 0..8 and affine grid. Two cell shapes:
  - row groups (default): one output row x one group of `group_size` input columns (the last group may
    be shorter); per-cell tensors are [out, n_groups] and cell (r, g) covers W[r, g*group_size ...];
  - row clusters (`clusters` given, CVXQ's own cells): a cluster of output rows x one input column;
    clusters[r] is row r's cluster, per-cell tensors are [n_clusters, in] and cell (k, c) covers the
    rows of cluster k in column c.
    W[r, c] = (codes[r, c] - zeros[cell]) * scales[cell]
A width-0 cell has no codes and no zero point: its one value, the cell's centre, is stored as its
scale (held in memory with zero = -1, so the formula above still gives it). Stored tensors:
`qweight` - codes bit-packed per width (all weights of width-1 cells in row-major order, then width
2, ...), `qwidths` - the widths bit-packed at `width_bits`, `scales` - fp16 per cell, `qzeros` -
zero points packed per width like the codes (cells in row-major order), and with row clusters
`qclusters` - int16 [out], each row's cluster. The companded grid (`grid` "laplace", CVXQ's
Laplace-shaped option) has no zero points: W[r, c] = scales[cell] * laplace_levels(width)[codes[r, c]].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import packing
from .qtensor import VariableWidth, dequantize_codes, dequantize_levels, expand_groups, group_sizes, num_groups

STORED = ("qweight", "qwidths", "scales", "qzeros", "qclusters")


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
    """Exact bits the layout stores for row-group cells of these widths [out, n_groups] (bias not included)."""
    return cells_stored_bits(widths, cell_sizes(widths, in_features, group_size), wbits)


def cell_sizes(widths: torch.Tensor, in_features: int, group_size: int, clusters: torch.Tensor | None = None) -> torch.Tensor:
    """Weights per cell, broadcastable to the per-cell `widths`: group sizes [1, n_groups] for row-group
    cells, rows per cluster [n_clusters, 1] for row-cluster cells."""
    if clusters is None:
        return group_sizes(in_features, group_size).to(widths.device)[None, :]
    return cluster_sizes(clusters, widths.shape[0]).to(widths.device)[:, None]


def cluster_sizes(clusters: torch.Tensor, n_clusters: int | None = None) -> torch.Tensor:
    """Rows per cluster [n_clusters] of a row -> cluster map."""
    return torch.bincount(clusters.to(torch.long), minlength=n_clusters or 0)


def cluster_stored_bits(widths: torch.Tensor, clusters: torch.Tensor, wbits: int, zero_points: bool = True) -> int:
    """Exact bits the layout stores for row-cluster cells (widths [n_clusters, in]), qclusters included;
    zero_points False: the companded grid, which stores none."""
    return cells_stored_bits(widths, cell_sizes(widths, 0, 0, clusters=clusters), wbits, zero_points) + 16 * clusters.numel()


def cells_stored_bits(widths: torch.Tensor, sizes: torch.Tensor, wbits: int, zero_points: bool = True) -> int:
    """Bits of cells of these widths and sizes (broadcast to widths): per cell an fp16 scale, a width field
    and (zero_points) a zero point of its width, and its codes; each width's codes and zeros packed apart."""
    n = widths.numel()
    total = 16 * n + 8 * packing.packed_nbytes(n, wbits)
    n_cells = torch.bincount(widths.reshape(-1).to(torch.long), minlength=9).tolist()
    n_weights = _per_width(widths, sizes)
    for b in range(1, 9):
        if n_cells[b]:
            total += 8 * (packing.packed_nbytes(n_weights[b], b) + (packing.packed_nbytes(n_cells[b], b) if zero_points else 0))
    return total


def _per_width(widths: torch.Tensor, sizes: torch.Tensor) -> list[int]:
    """Weights of each width 0..8 in cells of these widths and sizes (broadcast to widths)."""
    return torch.bincount(widths.reshape(-1).to(torch.long), weights=sizes.expand(widths.shape).reshape(-1).to(torch.float64),
                          minlength=9).round().to(torch.long).tolist()


def width_map(widths: torch.Tensor, shape: tuple[int, int], group_size: int,
              clusters: torch.Tensor | None = None) -> torch.Tensor:
    """Per-cell values (widths, scales, ...) broadcast to one per weight [out, in]."""
    if clusters is None:
        return expand_groups(widths, shape[1], group_size)
    return widths[clusters.to(widths.device, torch.long)]


def width_counts(widths: torch.Tensor, shape: tuple[int, int], group_size: int,
                 clusters: torch.Tensor | None = None) -> list[int]:
    """Weights of each width 0..8 (what each qweight segment holds), from the per-cell widths and cell
    sizes, without a per-weight map."""
    return _per_width(widths, cell_sizes(widths, shape[1], group_size, clusters))


@dataclass
class MixedWeight(VariableWidth):
    """Codes, per-cell widths, fp16 scales and integer zero points (-1 at width-0 cells)."""

    codes: torch.Tensor  # [out, in] uint8
    widths: torch.Tensor  # per cell uint8: [out, n_groups], or [n_clusters, in] with clusters
    scales: torch.Tensor  # per cell float16
    zeros: torch.Tensor  # per cell float32 integers, -1 at width 0
    group_size: int  # columns per row group; with clusters, the nominal rows per cluster
    wbits: int = 4  # stored width field
    clusters: torch.Tensor | None = None  # [out] each row's cluster: row-cluster x column cells
    grid: str = "affine"  # or "laplace": the companded grid scale * laplace_levels(width)[code], no zero points

    layout = "mixed"

    def cell_map(self, t: torch.Tensor) -> torch.Tensor:
        """A per-cell tensor broadcast to one value per weight [out, in]."""
        return width_map(t, self.shape, self.group_size, self.clusters)

    def mean_width(self) -> float:
        """Code bits per weight (cell widths weighted by cell size)."""
        return float(self.cell_map(self.widths.to(torch.float32)).mean())

    def spec(self) -> dict:
        spec = {"layout": "mixed", "width_bits": self.wbits, "mean_width": round(self.mean_width(), 4)}
        if self.clusters is not None:
            spec["clusters"] = int(self.widths.shape[0])
        if self.grid != "affine":
            spec["grid"] = self.grid
        return spec

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        scale = self.cell_map(self.scales.to(torch.float32))
        if self.grid == "laplace":
            return dequantize_levels(self.codes, self.cell_map(self.widths), scale).to(dtype)
        zero = self.cell_map(self.zeros.to(torch.float32))
        return dequantize_codes(self.codes, scale, zero).to(dtype)

    def round_to_grid(self, W: torch.Tensor) -> torch.Tensor:
        """W rounded onto this weight's cell grids (the "before" of error compensation), float32."""
        from .grid import companded_quantize, quantize_dequantize

        cell = lambda t: self.cell_map(t.to(W.device, torch.float32))
        if self.grid == "laplace":
            return companded_quantize(W, cell(self.scales), cell(self.widths))[1]
        return quantize_dequantize(W, cell(self.scales), cell(self.zeros), cell(self.widths))[1]

    def rows(self, start: int, stop: int) -> "MixedWeight":
        if self.clusters is None:
            return MixedWeight(self.codes[start:stop], self.widths[start:stop], self.scales[start:stop],
                               self.zeros[start:stop], self.group_size, self.wbits, None, self.grid)
        part = self.clusters[start:stop].to(torch.long)
        c0, c1 = int(part.min()), int(part.max()) + 1
        rest = torch.cat([self.clusters[:start], self.clusters[stop:]]).to(torch.long)
        if bool(((rest >= c0) & (rest < c1)).any()):
            raise ValueError("a row cluster spans the rows asked for and others")
        return MixedWeight(self.codes[start:stop], self.widths[c0:c1], self.scales[c0:c1], self.zeros[c0:c1],
                           self.group_size, self.wbits, (part - c0).to(torch.int16), self.grid)

    def packed_state(self) -> dict[str, torch.Tensor]:
        state = {
            "qweight": pack_by_width(self.codes, self.cell_map(self.widths)),
            "qwidths": packing.pack(self.widths, self.wbits),
            "scales": self.scales.to(torch.float16).contiguous(),
        }
        if self.grid == "affine":
            state["qzeros"] = pack_by_width(self.zeros.clamp_min(0).to(torch.uint8), self.widths)
        if self.clusters is not None:
            state["qclusters"] = self.clusters.to(torch.int16).contiguous()
        return state

    @classmethod
    def from_packed(cls, state: dict[str, torch.Tensor], shape: tuple[int, int], group_size: int,
                    wbits: int, grid: str = "affine") -> "MixedWeight":
        out_f, in_f = shape
        clusters = state.get("qclusters")
        if clusters is not None:
            if clusters.numel() != out_f or (out_f and int(clusters.min()) < 0):
                raise ValueError("qclusters must give each row a cluster index >= 0")
            cells = (int(clusters.max()) + 1 if out_f else 0, in_f)
        else:
            cells = (out_f, num_groups(in_f, group_size))
        scales = state["scales"]
        if tuple(scales.shape) != cells:
            raise ValueError(f"scales have shape {tuple(scales.shape)}, expected {cells}")
        if state["qwidths"].numel() != packing.packed_nbytes(cells[0] * cells[1], wbits):
            raise ValueError("qwidths has the wrong size for this layer")
        widths = packing.unpack(state["qwidths"], wbits, cells[0] * cells[1]).view(*cells)
        if widths.numel() and int(widths.max()) > 8:
            raise ValueError("cell widths above 8 bits")
        codes = unpack_by_width(state["qweight"], width_map(widths, shape, group_size, clusters))
        if grid == "laplace":
            zeros = torch.zeros(widths.shape, device=widths.device)
        elif grid == "affine":
            zeros = unpack_by_width(state["qzeros"], widths).to(torch.float32)
        else:
            raise ValueError(f"unknown grid {grid!r}")
        zeros = torch.where(widths == 0, -1.0, zeros)
        return cls(codes, widths, scales, zeros, group_size, wbits, clusters, grid)
