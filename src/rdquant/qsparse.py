"""The sparse layouts' weights (SLiM; layouts.Sparse24, layouts.SparseHalf). 2:4: in every run of four
consecutive inputs of a row two weights are kept, as codes on per-group affine grids, and where they sit
is 2 bits per kept value. Unstructured 50% (`SparseHalfWeight`): any half of each row's weights is kept,
and where they sit is a bitmask, 1 bit per weight: the same 2 bits per kept value as 2:4, a free mask.

    kept values  codes [out, in / 2] (uint8; row-major, in column order), bit-packed at `bits`
    positions    meta [out, in / 4]: one 4-bit nibble per run of four, idx0 | idx1 << 2 with idx0 < idx1
                 (the per-run metadata of CUTLASS / cuSPARSELt's 2:4 format, before their tile reordering),
                 packed two nibbles per byte, low nibble first
    grid         scales [out, n_groups] fp16 (+ packed zero points when asymmetric); groups run along
                 the dense input columns, ragged last group allowed, as in the affine layout

A weight is W[r, 4k + idx_j] = (codes[r, 2k + j] - zero) * scale, every other entry 0; unstructured,
W[r, c_k] = (codes[r, k] - zero) * scale with c_k the row's k-th kept column. This module never imports
the algorithms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import packing
from .qtensor import GroupGrid, dequantize_codes, unpack_grid

# the six ways to keep two of four, as (idx0, idx1); a nibble idx0 | idx1 << 2 is valid iff idx0 < idx1
PAIRS = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))
VALID_NIBBLES = frozenset(a | b << 2 for a, b in PAIRS)


PATTERNS = ("2:4", "unstructured")  # --sparsity


def check_shape(in_features: int, pattern: str = "2:4") -> None:
    """2:4 runs need whole runs of four inputs; half of every row, an even width."""
    if pattern == "2:4" and in_features % 4:
        raise ValueError(f"2:4 sparsity needs input widths that are a multiple of 4, got {in_features}")
    if in_features % 2:
        raise ValueError(f"50% sparsity keeps half of every row, so it needs even input widths, got {in_features}")


def kept_positions(mask: torch.Tensor) -> torch.Tensor:
    """The kept columns' offsets within their run [out, in/4, 2] (long, ascending) of a 2:4 mask [out, in]."""
    out_f, in_f = mask.shape
    check_shape(in_f)
    runs = mask.reshape(out_f, in_f // 4, 4)
    if not bool((runs.sum(-1) == 2).all()):
        raise ValueError("the mask is not 2:4: some run of four inputs does not keep exactly two")
    # ascending offsets of the two kept entries: sort (not kept first) by offset
    order = torch.argsort((~runs).to(torch.int8) * 4 + torch.arange(4, device=mask.device), dim=-1)
    return order[..., :2]


def mask_of(idx: torch.Tensor, in_features: int) -> torch.Tensor:
    """The dense bool mask [out, in] of kept offsets idx [out, in/4, 2]."""
    out_f = idx.shape[0]
    mask = torch.zeros(out_f, in_features // 4, 4, dtype=torch.bool, device=idx.device)
    mask.scatter_(-1, idx.to(torch.long), True)
    return mask.reshape(out_f, in_features)


def kept_columns(idx: torch.Tensor) -> torch.Tensor:
    """The dense column of every kept value [out, in/2] (long)."""
    base = 4 * torch.arange(idx.shape[1], device=idx.device).view(1, -1, 1)
    return (base + idx.to(torch.long)).reshape(idx.shape[0], -1)


def pack_meta(idx: torch.Tensor) -> torch.Tensor:
    """Nibbles idx0 | idx1 << 2, two per byte (low first): [out * in / 8] uint8."""
    nib = (idx[..., 0] | (idx[..., 1] << 2)).to(torch.uint8)
    return packing.pack(nib.reshape(-1), 4)


def unpack_meta(meta: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Kept offsets [out, in/4, 2] (long) from the packed nibbles; a nibble that is no 2:4 pair is refused."""
    n = out_features * (in_features // 4)
    if meta.numel() != packing.packed_nbytes(n, 4):
        raise ValueError(f"meta has {meta.numel()} bytes, a {out_features}x{in_features} 2:4 layer needs "
                         f"{packing.packed_nbytes(n, 4)}")
    nib = packing.unpack(meta, 4, n).to(torch.long)
    idx0, idx1 = nib & 3, nib >> 2
    if not bool((idx0 < idx1).all()):
        raise ValueError("meta holds a nibble that is not a 2:4 position pair")
    return torch.stack([idx0, idx1], -1).view(out_features, in_features // 4, 2)


class _KeptValues(GroupGrid):
    """What both sparse weights share: codes [out, in/2] of the kept values in column order, on per-group
    grids along the dense input; `kept_cols()` [out, in/2] (long) says where each sits."""

    codes: torch.Tensor
    group_size: int

    def kept_cols(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, int]:
        return (self.codes.shape[0], 2 * self.codes.shape[1])

    def _kept_grid(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(columns, scale, zero) of every kept value [out, in/2]."""
        cols = self.kept_cols()
        G = self.shape[1] if self.group_size == -1 else self.group_size
        g = cols // G
        return cols, self.scales.to(torch.float32).gather(1, g), self.zero_points().to(torch.float32).gather(1, g)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        cols, s, z = self._kept_grid()
        W = torch.zeros(self.shape, dtype=torch.float32, device=self.codes.device)
        W.scatter_(1, cols, dequantize_codes(self.codes, s, z))
        return W.to(dtype)

    def round_to_grid(self, W: torch.Tensor) -> torch.Tensor:
        """W's kept entries rounded to nearest on this weight's grids (the others 0), dequantized: plain
        rounding, the 'before' of the sweep's error compensation."""
        from .grid import quantize

        cols, s, z = self._kept_grid()
        w = W.to(torch.float32).gather(1, cols.to(W.device))
        out = torch.zeros(self.shape, dtype=torch.float32, device=W.device)
        out.scatter_(1, cols.to(W.device), dequantize_codes(quantize(w, s.to(W.device), z.to(W.device), self.bits), s, z))
        return out

    def _grid_state(self) -> dict[str, torch.Tensor]:
        state = {"scales": self.scales.to(torch.float16).contiguous()}
        if self.zeros is not None:
            state["qzeros"] = packing.pack(self.zeros, self.bits)
        return state

    @staticmethod
    def _unpack_codes(state: dict[str, torch.Tensor], shape: tuple[int, int], bits: int) -> torch.Tensor:
        out_f, in_f = shape
        kept = out_f * in_f // 2
        if state["qweight"].numel() != packing.packed_nbytes(kept, bits):
            raise ValueError(f"qweight has {state['qweight'].numel()} bytes, {kept} kept {bits}-bit codes need "
                             f"{packing.packed_nbytes(kept, bits)}")
        return packing.unpack(state["qweight"], bits, kept).view(out_f, in_f // 2)


@dataclass
class Sparse24Weight(_KeptValues):
    """Kept codes, their positions and the group grid of one 2:4 sparse linear layer."""

    layout = "sparse24"  # layouts.Sparse24

    codes: torch.Tensor  # [out, in/2] uint8, kept values in column order
    idx: torch.Tensor  # [out, in/4, 2] long, kept offsets within each run of four
    scales: torch.Tensor  # [out, n_groups] float16, groups along the dense input
    zeros: torch.Tensor | None  # [out, n_groups] uint8, None when symmetric
    bits: int
    group_size: int

    def mask(self) -> torch.Tensor:
        """The dense bool mask [out, in] of the kept weights."""
        return mask_of(self.idx, self.shape[1])

    def kept_cols(self) -> torch.Tensor:
        return kept_columns(self.idx)

    def spec(self) -> dict:
        return {"layout": "sparse24"}

    def rows(self, start: int, stop: int) -> "Sparse24Weight":
        zeros = None if self.zeros is None else self.zeros[start:stop]
        return Sparse24Weight(self.codes[start:stop], self.idx[start:stop], self.scales[start:stop], zeros,
                              self.bits, self.group_size)

    @classmethod
    def from_dense(cls, codes: torch.Tensor, mask: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                   bits: int, group_size: int) -> "Sparse24Weight":
        """From dense codes [out, in] and a 2:4 mask (the pruned codes are dropped)."""
        idx = kept_positions(mask)
        kept = codes.gather(1, kept_columns(idx).to(codes.device))
        return cls(kept.to(torch.uint8), idx, scales.to(torch.float16), zeros, bits, group_size)

    # --- packed form, as stored in the artifact ---------------------------------------------
    def packed_state(self) -> dict[str, torch.Tensor]:
        return {"qweight": packing.pack(self.codes, self.bits), "meta": pack_meta(self.idx), **self._grid_state()}

    @classmethod
    def from_packed(cls, state: dict[str, torch.Tensor], shape: tuple[int, int], bits: int,
                    group_size: int) -> "Sparse24Weight":
        out_f, in_f = shape
        check_shape(in_f)
        codes = cls._unpack_codes(state, shape, bits)
        idx = unpack_meta(state["meta"], out_f, in_f)
        scales, zeros = unpack_grid(state, out_f, in_f, bits, group_size)
        return cls(codes, idx, scales, zeros, bits, group_size)


def half_mask_check(mask: torch.Tensor) -> None:
    """An unstructured 50% mask keeps exactly half of every row."""
    out_f, in_f = mask.shape
    check_shape(in_f, "unstructured")
    if not bool((mask.sum(1) == in_f // 2).all()):
        raise ValueError("the mask does not keep exactly half of every row")


def top_half(score: torch.Tensor) -> torch.Tensor:
    """The bool mask keeping the larger half of every row's scores [rows, cols] (cols even)."""
    keep = torch.zeros_like(score, dtype=torch.bool)
    keep.scatter_(1, torch.topk(score, score.shape[1] // 2, dim=1, sorted=False).indices, True)
    return keep


@dataclass
class SparseHalfWeight(_KeptValues):
    """Kept codes, their bitmask and the group grid of one linear layer with half of every row pruned
    (unstructured 50%)."""

    layout = "sparse50"  # layouts.SparseHalf

    codes: torch.Tensor  # [out, in/2] uint8, kept values in column order
    keep: torch.Tensor  # [out, in] bool, exactly in/2 per row
    scales: torch.Tensor  # [out, n_groups] float16
    zeros: torch.Tensor | None  # [out, n_groups] uint8, None when symmetric
    bits: int
    group_size: int

    def mask(self) -> torch.Tensor:
        return self.keep

    def kept_cols(self) -> torch.Tensor:
        return self.keep.nonzero()[:, 1].view(self.codes.shape)  # row-major: each row's columns ascending

    def spec(self) -> dict:
        return {"layout": "sparse50"}

    def rows(self, start: int, stop: int) -> "SparseHalfWeight":
        zeros = None if self.zeros is None else self.zeros[start:stop]
        return SparseHalfWeight(self.codes[start:stop], self.keep[start:stop], self.scales[start:stop], zeros,
                                self.bits, self.group_size)

    @classmethod
    def from_dense(cls, codes: torch.Tensor, mask: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                   bits: int, group_size: int) -> "SparseHalfWeight":
        """From dense codes [out, in] and a mask keeping half of every row (the pruned codes are dropped)."""
        half_mask_check(mask)
        mask = mask.to(codes.device)
        kept = codes[mask].view(codes.shape[0], codes.shape[1] // 2)
        return cls(kept.to(torch.uint8), mask, scales.to(torch.float16), zeros, bits, group_size)

    def packed_state(self) -> dict[str, torch.Tensor]:
        return {"qweight": packing.pack(self.codes, self.bits),
                "bitmask": packing.pack(self.keep.reshape(-1).to(torch.uint8), 1), **self._grid_state()}

    @classmethod
    def from_packed(cls, state: dict[str, torch.Tensor], shape: tuple[int, int], bits: int,
                    group_size: int) -> "SparseHalfWeight":
        out_f, in_f = shape
        check_shape(in_f, "unstructured")
        codes = cls._unpack_codes(state, shape, bits)
        if state["bitmask"].numel() != packing.packed_nbytes(out_f * in_f, 1):
            raise ValueError(f"bitmask has {state['bitmask'].numel()} bytes, a {out_f}x{in_f} layer needs "
                             f"{packing.packed_nbytes(out_f * in_f, 1)}")
        keep = packing.unpack(state["bitmask"], 1, out_f * in_f).view(out_f, in_f).bool()
        half_mask_check(keep)
        scales, zeros = unpack_grid(state, out_f, in_f, bits, group_size)
        return cls(codes, keep, scales, zeros, bits, group_size)
