"""Uniform group grids: the one implementation of "compute group scales and zero points" and of
"quantize against a grid", shared by RTN, GPTQ and every later method that uses an affine grid."""

from __future__ import annotations

import torch

from .qtensor import dequantize_codes, laplace_levels, level_table

_MIN_SCALE = 1e-7  # keeps fp16 scales non-zero for all-tiny groups
FP16_MANTISSA = 10


def store_scale(x: torch.Tensor, mantissa_bits: int = FP16_MANTISSA) -> torch.Tensor:
    """`x` rounded to the stored fp16 scale, keeping `mantissa_bits` of fp16's 10 mantissa
    bits (round to nearest even); as float32. Fewer bits cost a relative error of at most
    2**-(mantissa_bits + 1) and leave the low mantissa bits zero, which a codec then removes
    (issue: lossless coding; the packed file stays plain fp16)."""
    if not 1 <= mantissa_bits <= FP16_MANTISSA:
        raise ValueError(f"scale mantissa bits must be in 1..{FP16_MANTISSA}")
    x = x.to(torch.float32)
    if mantissa_bits < FP16_MANTISSA:  # round the fp32 pattern to mantissa_bits, then fp16 holds it exactly
        shift = 23 - mantissa_bits
        b = x.contiguous().view(torch.int32)
        b = ((b + ((1 << (shift - 1)) - 1) + ((b >> shift) & 1)) >> shift) << shift
        x = b.view(torch.float32).view(x.shape)
    return x.to(torch.float16).to(torch.float32)

def max_code(bits: "int | torch.Tensor") -> "int | torch.Tensor":
    """2**bits - 1: the largest code of a width (elementwise for a tensor of widths)."""
    if isinstance(bits, torch.Tensor):
        return torch.exp2(bits.to(torch.float32)) - 1
    return (1 << bits) - 1


def grid_params(
    w: torch.Tensor,
    bits: "int | torch.Tensor",
    symmetric: bool,
    clip_search: int = 0,
    max_shrink: float = 0.3,
    col_weight: torch.Tensor | None = None,
    scale_bits: int = FP16_MANTISSA,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of the group `w` [rows, cols].

    Min-max grid (GPTQ's `find_params`: the range always contains 0), optionally shrunk by the factor
    in {1, 1 - max_shrink/clip_search, ...} that minimises the (col_weight-weighted) squared rounding
    error of each row. The scale is rounded to its stored form here (fp16 with `scale_bits` mantissa
    bits, `store_scale`), so every later use sees the stored value.
    Returns (scale, zero) as float32 [rows, 1]; zero holds integers. `bits` may be a tensor [rows, 1]
    of widths >= 1 (width-0 cells are the caller's: see mixed_group_grid).
    """
    w = w.to(torch.float32)
    xmin = w.min(dim=1, keepdim=True).values.clamp(max=0)
    xmax = w.max(dim=1, keepdim=True).values.clamp(min=0)
    scale, zero = _minmax_grid(xmin, xmax, bits, symmetric, scale_bits)
    if clip_search <= 0:
        return scale, zero
    cw = torch.ones(1, w.shape[1], device=w.device) if col_weight is None else col_weight.reshape(-1, w.shape[1])
    if w.is_cuda or _BATCHED_SEARCH:
        return _batched_clip_search(w, xmin, xmax, bits, symmetric, clip_search, max_shrink, cw, scale_bits)
    best = _grid_error(w, scale, zero, bits, cw)
    for i in range(1, clip_search + 1):
        p = 1.0 - max_shrink * i / clip_search
        s, z = _minmax_grid(xmin * p, xmax * p, bits, symmetric, scale_bits)
        err = _grid_error(w, s, z, bits, cw)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero


_BATCHED_SEARCH = False  # tests set it to run the batched search on the CPU
_SEARCH_ELEMENTS = 1 << 26  # rows x candidates x cols per batched-search chunk (256 MB of fp32)


def _batched_clip_search(w, xmin, xmax, bits, symmetric, clip_search, max_shrink, cw, scale_bits):
    """grid_params' clip search with every candidate at once (a [rows, candidates, cols] tensor, in
    row chunks): on a GPU the loop's ~50 small kernels per candidate dominate GPTQ with grids fitted
    per lazy block (CVXQ's cluster cells). Same candidates, same rule (the first least error wins)."""
    rows, n = w.shape
    p = 1.0 - max_shrink * torch.arange(clip_search + 1, device=w.device, dtype=torch.float32) / clip_search
    step = max(1, _SEARCH_ELEMENTS // ((clip_search + 1) * n))
    scales, zeros = [], []
    for a in range(0, rows, step):
        b = min(a + step, rows)
        bt = bits[a:b] if isinstance(bits, torch.Tensor) else bits
        s, z = _minmax_grid(xmin[a:b] * p, xmax[a:b] * p, bt, symmetric, scale_bits)  # [r, S]
        bq = bt[:, :, None] if isinstance(bt, torch.Tensor) else bt
        _, deq = quantize_dequantize(w[a:b, None, :], s[:, :, None], z[:, :, None], bq)
        c = cw if cw.shape[0] == 1 else cw[a:b]
        err = ((deq - w[a:b, None, :]).square() * c[:, None, :]).sum(-1)  # [r, S]
        k = torch.argmin(err, dim=1, keepdim=True)  # the first of equal errors, as the loop keeps
        scales.append(s.gather(1, k))
        zeros.append(z.gather(1, k))
    return torch.cat(scales), torch.cat(zeros)


def group_grid(
    W: torch.Tensor,
    bits: "int | torch.Tensor",
    symmetric: bool,
    group_size: int,
    clip_search: int = 0,
    max_shrink: float = 0.3,
    col_weight: torch.Tensor | None = None,
    scale_bits: int = FP16_MANTISSA,
) -> tuple[torch.Tensor, torch.Tensor]:
    """grid_params for every group of W [out, in] at once (ragged last group handled):
    (scales, zeros) as float32 [out, n_groups]. `bits` may be a tensor [out, n_groups] (>= 1)."""
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
        g0 = c0 // g
        b = bits[:, g0 : g0 + n].reshape(-1, 1) if isinstance(bits, torch.Tensor) else bits
        scale, zero = grid_params(Wg, b, symmetric, clip_search, max_shrink, cw, scale_bits)
        scales.append(scale.reshape(out_f, n))
        zeros.append(zero.reshape(out_f, n))
    return torch.cat(scales, 1), torch.cat(zeros, 1)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: "int | torch.Tensor") -> torch.Tensor:
    """Integer codes of `w` on the grid (scale, zero), clamped to [0, 2**bits - 1], as float32."""
    q = torch.round(w.to(torch.float32) / scale) + zero
    maxq = max_code(bits)
    return q.clamp(0, maxq) if isinstance(maxq, int) else torch.minimum(q.clamp_min(0), maxq)


def quantize_dequantize(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: "int | torch.Tensor"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, dequantized values) of `w` on the grid."""
    codes = quantize(w, scale, zero, bits)
    return codes, dequantize_codes(codes, scale, zero)


def _minmax_grid(
    xmin: torch.Tensor, xmax: torch.Tensor, bits: "int | torch.Tensor", symmetric: bool, scale_bits: int = FP16_MANTISSA
) -> tuple[torch.Tensor, torch.Tensor]:
    maxq = max_code(bits)
    if symmetric:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale = store_scale(((xmax - xmin) / maxq).clamp(min=_MIN_SCALE), scale_bits)
    if symmetric:
        zero = torch.floor((torch.zeros_like(scale) + maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale).clamp_min(0)
        zero = zero.clamp(max=maxq) if isinstance(maxq, int) else torch.minimum(zero, maxq)
    return scale, zero


def _grid_error(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: "int | torch.Tensor", col_weight: torch.Tensor
) -> torch.Tensor:
    _, deq = quantize_dequantize(w, scale, zero, bits)
    return ((deq - w).square() * col_weight).sum(dim=1, keepdim=True)


def mixed_group_grid(
    W: torch.Tensor,
    widths: torch.Tensor,
    group_size: int,
    clip_search: int = 0,
    max_shrink: float = 0.3,
    col_weight: torch.Tensor | None = None,
    scale_bits: int = FP16_MANTISSA,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric grids for groups of mixed widths [out, n_groups] (0..8): group_grid where the width is
    >= 1; a width-0 group is replaced by its (col_weight-weighted) mean, stored as the scale with
    zero = -1, so (0 - zero) * scale reproduces it through the one dequantization formula."""
    widths = widths.to(W.device)
    scales, zeros = group_grid(W, widths.clamp_min(1), False, group_size, clip_search, max_shrink, col_weight, scale_bits)
    out_f, in_f = W.shape
    g = in_f if group_size == -1 else group_size
    cw = torch.ones(in_f, device=W.device) if col_weight is None else col_weight.to(W.device, torch.float32).clamp_min(0)
    cw = torch.where(cw.sum() > 0, cw, torch.ones_like(cw))
    idx = torch.arange(in_f, device=W.device) // g
    n_g = scales.shape[1]
    num = torch.zeros(out_f, n_g, device=W.device).index_add_(1, idx, W.to(torch.float32) * cw)
    den = torch.zeros(n_g, device=W.device).index_add_(0, idx, cw).clamp_min(1e-30)
    centre = (num / den).to(torch.float16).to(torch.float32)
    zero_w = widths == 0
    return torch.where(zero_w, centre, scales), torch.where(zero_w, -1.0, zeros)


def companded_quantize(w: torch.Tensor, scale: torch.Tensor, bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, values) of `w` on the companded grid: the nearest of scale * laplace_levels(bits); inputs
    broadcast, `bits` a tensor of widths 0..8 (width 0: the one value `scale`). The Laplace CDF puts x in
    the quantile cell of level k, so the nearest level is k - 1, k or k + 1: three lookups, no loop over widths."""
    w, scale, bits = torch.broadcast_tensors(w.to(torch.float32), scale.to(w.device, torch.float32), bits.to(w.device))
    x = w / scale
    table = level_table(w.device)
    bl = bits.to(torch.long)
    top = (1 << bl) - 1
    u = torch.where(x < 0, 0.5 * torch.exp(x.clamp(max=0)), 1 - 0.5 * torch.exp(-x.clamp(min=0)))
    k = torch.minimum(torch.floor(u * (top + 1)).to(torch.long).clamp_min(0), top)
    best, best_d = k, torch.full_like(x, float("inf"))
    for d in (-1, 0, 1):
        kk = torch.minimum((k + d).clamp_min(0), top)
        dist = (x - table[bl, kk]).abs()
        closer = dist < best_d
        best, best_d = torch.where(closer, kk, best), torch.where(closer, dist, best_d)
    return best.to(torch.float32), table[bl, best] * scale


def companded_params(w: torch.Tensor, bits: torch.Tensor, col_weight: torch.Tensor, clip_search: int = 20,
                     max_shrink: float = 0.3, scale_bits: int = FP16_MANTISSA) -> torch.Tensor:
    """Scale per row of `w` [cells, n] for the companded grid at widths `bits` [cells, 1] (>= 1): like the
    uniform grid's clip search, the outermost level is put at p * max|w|, p in {1, ..., 1 - max_shrink}
    (`clip_search` steps), and the p with the least col_weight-weighted squared error wins (fp16 scale).
    Anchoring to the range keeps large weights, which an MSE-only scale would clip."""
    top = torch.stack([laplace_levels(b)[-1] for b in range(9)]).to(w.device)[bits.to(torch.long)]
    wmax = (w.abs() * (col_weight > 0)).amax(1, keepdim=True).clamp_min(_MIN_SCALE)
    best_err = torch.full_like(wmax, float("inf"))
    best = wmax
    for i in range(max(clip_search, 0) + 1):
        frac = 1.0 - max_shrink * i / clip_search if clip_search > 0 else 1.0
        s = store_scale((wmax * frac / top).clamp_min(_MIN_SCALE), scale_bits)
        err = ((companded_quantize(w, s, bits)[1] - w).square() * col_weight).sum(1, keepdim=True)
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better, s, best)
    return best


def cluster_grid(
    W: torch.Tensor,
    widths: torch.Tensor,
    clusters: torch.Tensor,
    clip_search: int = 0,
    max_shrink: float = 0.3,
    companded: bool = False,
    scale_bits: int = FP16_MANTISSA,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grids of row-cluster x column cells: W [out, k] (k columns), widths [n_clusters, k] (0..8), clusters
    [out] each row's cluster -> (scales, zeros) [n_clusters, k], width-0 cells as in mixed_group_grid
    (centre as the scale, zero -1). Asymmetric uniform grids, or the companded grid (scales only, zeros
    0). Clusters are padded to one length with a repeat of their first row, weighted 0 in the search."""
    out_f, k = W.shape
    n_c = widths.shape[0]
    dev = W.device
    clusters = clusters.to(dev, torch.long)
    order = torch.argsort(clusters, stable=True)
    sizes = torch.bincount(clusters, minlength=n_c)
    m = max(int(sizes.max()), 1)
    start = torch.cumsum(sizes, 0) - sizes
    pos = torch.arange(m, device=dev)[None, :]
    valid = pos < sizes[:, None]  # [n_c, m]
    idx = order[(start[:, None] + torch.where(valid, pos, 0)).clamp(max=max(out_f - 1, 0))]  # [n_c, m] rows
    Wc = W.to(torch.float32)[idx].permute(0, 2, 1).reshape(n_c * k, m)  # one cell per row
    cw = valid[:, None, :].expand(n_c, k, m).reshape(n_c * k, m).to(torch.float32)
    b = widths.to(dev).reshape(-1, 1).clamp_min(1)
    if companded:
        scale = companded_params(Wc, b, cw, clip_search, max_shrink, scale_bits)
        zero = torch.zeros_like(scale)
    else:
        scale, zero = grid_params(Wc, b, False, clip_search, max_shrink, cw, scale_bits)
    centre = ((Wc * cw).sum(1, keepdim=True) / cw.sum(1, keepdim=True).clamp_min(1)).to(torch.float16).to(torch.float32)
    w0 = widths.to(dev).reshape(-1, 1) == 0
    scale, zero = torch.where(w0, centre, scale), torch.where(w0, -1.0, zero)
    return scale.view(n_c, k), zero.view(n_c, k)
