"""Uniform group grids: the one implementation of "compute group scales and zero points" and of
"quantize against a grid", shared by RTN, GPTQ and every later method that uses an affine grid."""

from __future__ import annotations

import torch

from .qtensor import dequantize_codes

_MIN_SCALE = 1e-7  # keeps fp16 scales non-zero for all-tiny groups


def grid_params(
    w: torch.Tensor,
    bits: int,
    symmetric: bool,
    clip_search: int = 0,
    max_shrink: float = 0.3,
    col_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of the group `w` [rows, cols].

    Min-max grid (GPTQ's `find_params`: the range always contains 0), optionally shrunk by the factor
    in {1, 1 - max_shrink/clip_search, ...} that minimises the (col_weight-weighted) squared rounding
    error of each row. The scale is rounded to fp16 here, so every later use sees the stored value.
    Returns (scale, zero) as float32 [rows, 1]; zero holds integers.
    """
    w = w.to(torch.float32)
    xmin = w.min(dim=1, keepdim=True).values.clamp(max=0)
    xmax = w.max(dim=1, keepdim=True).values.clamp(min=0)
    scale, zero = _minmax_grid(xmin, xmax, bits, symmetric)
    if clip_search <= 0:
        return scale, zero
    cw = torch.ones(1, w.shape[1], device=w.device) if col_weight is None else col_weight.reshape(-1, w.shape[1])
    best = _grid_error(w, scale, zero, bits, cw)
    for i in range(1, clip_search + 1):
        p = 1.0 - max_shrink * i / clip_search
        s, z = _minmax_grid(xmin * p, xmax * p, bits, symmetric)
        err = _grid_error(w, s, z, bits, cw)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero


def group_grid(
    W: torch.Tensor,
    bits: int,
    symmetric: bool,
    group_size: int,
    clip_search: int = 0,
    max_shrink: float = 0.3,
    col_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """grid_params for every group of W [out, in] at once (ragged last group handled):
    (scales, zeros) as float32 [out, n_groups]."""
    out_f, in_f = W.shape
    g = in_f if group_size == -1 else group_size
    n_full = in_f // g
    parts = [(0, n_full * g, n_full)] if n_full else []
    if n_full * g < in_f:
        parts.append((n_full * g, in_f, 1))
    scales, zeros = [], []
    for c0, c1, n in parts:  # all groups of one width as rows of one [out * n, width] matrix
        Wg = W[:, c0:c1].reshape(out_f * n, (c1 - c0) // n)
        cw = None if col_weight is None else col_weight[c0:c1].reshape(n, -1).repeat(out_f, 1)
        scale, zero = grid_params(Wg, bits, symmetric, clip_search, max_shrink, cw)
        scales.append(scale.reshape(out_f, n))
        zeros.append(zero.reshape(out_f, n))
    return torch.cat(scales, 1), torch.cat(zeros, 1)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of `w` on the grid (scale, zero), clamped to [0, 2**bits - 1], as float32."""
    maxq = (1 << bits) - 1
    return torch.clamp(torch.round(w.to(torch.float32) / scale) + zero, 0, maxq)


def quantize_dequantize(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, dequantized values) of `w` on the grid."""
    codes = quantize(w, scale, zero, bits)
    return codes, dequantize_codes(codes, scale, zero)


def _minmax_grid(
    xmin: torch.Tensor, xmax: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    maxq = (1 << bits) - 1
    if symmetric:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale = ((xmax - xmin) / maxq).clamp(min=_MIN_SCALE).to(torch.float16).to(torch.float32)
    if symmetric:
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        zero = torch.clamp(torch.round(-xmin / scale), 0, maxq)
    return scale, zero


def _grid_error(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, col_weight: torch.Tensor
) -> torch.Tensor:
    _, deq = quantize_dequantize(w, scale, zero, bits)
    return ((deq - w).square() * col_weight).sum(dim=1, keepdim=True)
