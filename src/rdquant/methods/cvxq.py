"""CVXQ (Young 2024, arXiv 2409.02026): rate-distortion bit allocation across the whole model.

Before the sequential pass, every quantized linear is cut into cells that share a width and a grid:
  - `group` cells (solvers rtn and gptq): one output row x one group of group_size input columns;
  - `cluster` cells (solvers rtn and gptq, CVXQ's own): output rows sorted by sensitivity and cut into
    clusters of group_size rows, x one input column;
  - `column` cells (solver claq): one input column, all rows (CLAQ's column codebooks).
Cell i gets a variance S_i^2 (of its weights about their mean), a sensitivity G_i^2 (mean over its
weights, sensitivity.py) and a rate R_i(b) = the exact bits the artifact stores for it at width b
(codes + its share of scales / zero points / codebooks / width fields). One multiplier lambda for
the whole model sets every width, b_i = argmin_b n_i S_i^2 G_i^2 kappa(b) + lambda R_i(b) (the
rounded, clamped reverse water-filling B = 1/2 log2(S^2 G^2 / lambda) of the paper), and lambda is
found by bisection so the model's all-in size meets the target (allocate.waterfill). Then each layer
is quantized at its widths by plain rounding with a per-cell grid search, by GPTQ, or by CLAQ.

With `--rate coded` (uniform grids) the target counts the file after entropy coding: a cell's codes
cost their entropy under one table per width (coded_code_bits, from plain rounding of the layer at
every width), not b bits each, so cells whose codes are predictable (a peaked distribution) are
cheaper to widen. Side information is counted as stored.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..allocate import Cells, kappa
from ..config import CompressConfig
from ..errors import RdquantError
from ..memory import row_panels
from ..models import block_linears, find_blocks
from ..qmixed import cluster_stored_bits, stored_bits, width_bits, width_map
from ..qtensor import group_sizes, num_groups
from . import layermix
from .claq import claq_quantize, codebook_rates, layer_bits, n_scales
from .gptq import gptq_quantize, mixed_rtn

if TYPE_CHECKING:
    from ..source import BlockSource

@dataclass
class CvxqPlan:
    """The allocation: widths per layer ([out, n_groups] group cells, [n_clusters, in] cluster cells or
    [in] column cells), and each layer's row clusters ([out] cluster of every row) with cluster cells."""

    widths: dict[str, torch.Tensor]
    target_bits: float  # all-in bits per quantized weight the plan was made for
    planned_bits: float  # what the plan stores (exact, padding included); --rate coded: its modelled coded bits
    sensitivity: str
    cells: str
    seconds: float = 0.0
    summary: dict[str, float] = field(default_factory=dict)  # layer -> mean code width
    clusters: dict[str, torch.Tensor] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)  # seconds of the sensitivity pass and the allocation
    vocab: dict[str, int] = field(default_factory=dict)  # embedding / head -> the width the allocation chose
    types: dict[str, str] = field(default_factory=dict)  # --grid gguf: each layer's GGUF type (layermix.py)
    ranks: dict[str, int] = field(default_factory=dict)  # --lowrank auto: each layer's adapter rank (0: none)

    def to_dict(self) -> dict[str, Any]:
        enc = lambda ts, dt: {n: [list(t.shape), base64.b64encode(t.to(dt).numpy().tobytes()).decode()] for n, t in ts.items()}
        return {"widths": enc(self.widths, torch.uint8), "target_bits": self.target_bits, "planned_bits": self.planned_bits,
                "sensitivity": self.sensitivity, "cells": self.cells, "seconds": self.seconds, "summary": self.summary,
                "clusters": enc(self.clusters, torch.int16), "phases": self.phases, "vocab": self.vocab,
                "types": self.types, "ranks": self.ranks}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CvxqPlan":
        dec = lambda ts, dt: {n: torch.frombuffer(bytearray(base64.b64decode(b64)), dtype=dt).view(*shape).clone()
                              for n, (shape, b64) in ts.items()}
        return cls(dec(d["widths"], torch.uint8), d["target_bits"], d["planned_bits"], d["sensitivity"], d["cells"],
                   d["seconds"], d["summary"], dec(d.get("clusters", {}), torch.int16), d.get("phases", {}),
                   d.get("vocab", {}), d.get("types", {}), d.get("ranks", {}))


def cell_kind(cfg: CompressConfig) -> str:
    return "gguf" if cfg.grid == "gguf" else "column" if cfg.cvxq_solver == "claq" else cfg.cvxq_cells


MENU_KINDS = ("gguf", "layer")  # one choice per linear from a menu (layermix.py)


def min_bits(cfg: CompressConfig) -> int:
    """The narrowest width offered. Automatic (-1): 2 for uniform grids, whose 1-bit grid has a level
    fixed at 0 and whose width-0 cells cannot take GPTQ's error feedback (measured: docs/notes/benchmarks-lab.md §6),
    0 for CLAQ's column codebooks."""
    if cfg.cvxq_min_bits >= 0:
        return cfg.cvxq_min_bits
    return 0 if cell_kind(cfg) == "column" else min(2, cfg.cvxq_max_bits)


def _sens_rows(sens: torch.Tensor, a: int, b: int, in_f: int) -> torch.Tensor:
    """Rows a:b of the sensitivities in float64, [b - a, in]: a slice of [out, in] ones, a per-input proxy [in]
    repeated."""
    return (sens[a:b] if sens.dim() == 2 else sens).to(torch.float64).expand(b - a, in_f)


def group_cells(W: torch.Tensor, sens: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(distortion weight n S^2 G^2, size n) of every row x group cell of W [out, in], flattened row-major.
    `sens` is [out, in] (gradient) or [in] (proxy). Sums in float64, an eighth of the rows at a time (rows
    are independent here): whole-matrix float64 copies weigh 6x an 8B MLP matrix in float32."""
    out_f, in_f = W.shape
    sizes = group_sizes(in_f, group).to(torch.float64)
    n_g = sizes.numel()
    sizes = sizes.to(W.device)
    idx = torch.arange(in_f, device=W.device) // (in_f if group == -1 else group)
    var_sum = torch.empty(out_f, n_g, dtype=torch.float64, device=W.device)
    g2 = torch.empty_like(var_sum)
    for a, b in row_panels(out_f):
        Wp = W[a:b].to(torch.float64)
        zeros = lambda: torch.zeros(b - a, n_g, dtype=torch.float64, device=W.device)
        s1 = zeros().index_add_(1, idx, Wp)
        s2 = zeros().index_add_(1, idx, Wp.square())
        torch.div(zeros().index_add_(1, idx, _sens_rows(sens, a, b, in_f)), sizes, out=g2[a:b])
        torch.clamp_min(s2 - s1.square() / sizes, 0, out=var_sum[a:b])  # n * S^2
    return (var_sum.mul_(g2)).reshape(-1), sizes.expand(out_f, n_g).reshape(-1)


def group_rates(sizes: torch.Tensor, max_bits: int, wbits: int, grids: torch.Tensor | None = None,
                zero_points: bool = True) -> torch.Tensor:
    """[cells, max_bits + 1] bits of a cell at each width: codes, and per grid group in it an fp16
    scale (or centre), a zero point of the cell's width (not on the companded grid) and the width
    field (packing padding is budgeted per layer). `grids`: grid groups per cell (default 1)."""
    b = torch.arange(max_bits + 1, dtype=torch.float64)
    grids = torch.ones_like(sizes) if grids is None else grids
    return sizes[:, None] * b[None, :] + grids[:, None] * (16 + wbits + (b if zero_points else 0 * b))[None, :]


def width_cells(W: torch.Tensor, sens: torch.Tensor, cfg: CompressConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cells that share a width: row x `cvxq_cell_group` columns, each made of whole grid groups
    (group_size columns, own scale/zero). (distortion weight, size, grid groups) per cell, row-major."""
    w, sizes = group_cells(W, sens, cfg.group_size)
    return (*(to_width_cells(t, *W.shape, cfg) for t in (w, sizes, torch.ones_like(sizes))),)


def to_width_cells(t: torch.Tensor, out_f: int, in_f: int, cfg: CompressConfig) -> torch.Tensor:
    """Per grid group values ([out * n_groups] or [out * n_groups, k], row-major) summed over each width
    cell's groups."""
    per = cells_per_width(in_f, cfg)
    if per == 1:
        return t
    n_g = num_groups(in_f, cfg.group_size)
    idx = torch.arange(n_g) // per
    n_c = int(idx[-1]) + 1
    rest = t.shape[1:]
    acc = torch.zeros(out_f, n_c, *rest, dtype=torch.float64).index_add_(1, idx, t.view(out_f, n_g, *rest).to(torch.float64))
    return acc.reshape(out_f * n_c, *rest)


def cells_per_width(in_f: int, cfg: CompressConfig) -> int:
    """Grid groups per width cell."""
    n_g = num_groups(in_f, cfg.group_size)
    if cfg.cvxq_cell_group == 0 or cfg.group_size == -1:
        return 1
    if cfg.cvxq_cell_group == -1:
        return n_g
    return cfg.cvxq_cell_group // cfg.group_size


def row_clusters(W: torch.Tensor, sens: torch.Tensor, size: int) -> torch.Tensor:
    """[out] cluster of every row (int16): rows sorted by decreasing sensitivity (mean G^2 of the row;
    with a per-input proxy, its G^2-weighted energy), cut into clusters of `size` rows (-1: one cluster)."""
    def score(a: int, b: int) -> torch.Tensor:  # float64 an eighth of the rows at a time (rows are independent)
        if sens.dim() == 2:
            return sens[a:b].to(torch.float64).mean(1)
        return (W[a:b].to(torch.float64).square() * sens.to(torch.float64)[None, :]).mean(1)

    order = torch.argsort(torch.cat([score(a, b) for a, b in row_panels(W.shape[0])]), descending=True, stable=True)
    size = W.shape[0] if size == -1 else size
    clusters = torch.empty(W.shape[0], dtype=torch.int16, device=W.device)
    clusters[order] = (torch.arange(W.shape[0], device=W.device) // size).to(torch.int16)
    return clusters.cpu()


def cluster_cells(W: torch.Tensor, sens: torch.Tensor, clusters: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(distortion weight n S^2 G^2, size n) of every row-cluster x column cell, [n_clusters, in] flattened.
    The float64 sums take an eighth of the rows at a time, added in row order as one pass would."""
    idx = clusters.to(W.device, torch.long)
    n_c = int(idx.max()) + 1
    sizes = torch.bincount(idx, minlength=n_c).to(torch.float64)[:, None]
    s1, s2, g = (torch.zeros(n_c, W.shape[1], dtype=torch.float64, device=W.device) for _ in range(3))
    for a, b in row_panels(W.shape[0]):
        Wp, ip = W[a:b].to(torch.float64), idx[a:b]
        s1.index_add_(0, ip, Wp)
        s2.index_add_(0, ip, Wp.square())
        g.index_add_(0, ip, _sens_rows(sens, a, b, W.shape[1]))
    var_sum = (s2 - s1.square() / sizes).clamp_min(0)
    g2 = g / sizes
    return (var_sum * g2).reshape(-1), sizes.expand(n_c, W.shape[1]).reshape(-1)


def coded_code_bits(W: torch.Tensor, cfg: CompressConfig, lo: int, max_bits: int,
                    clusters: torch.Tensor | None = None) -> torch.Tensor:
    """[cells, max_bits + 1] coded bits of each cell's codes at each width (--rate coded), cells in
    group_cells / cluster_cells order: the cell rounded onto its own grid at width b, each code
    costing -log2 of its frequency among all the layer's codes at width b, i.e. what one table per
    width pays (mapping `mixed-widths`). Widths below `lo` (never offered) stay at b bits per code."""
    out_f, in_f = W.shape
    shape = (out_f, num_groups(in_f, cfg.group_size)) if clusters is None else (int(clusters.max()) + 1, in_f)
    n = shape[0] * shape[1]
    cell = width_map(torch.arange(n).view(shape), (out_f, in_f), cfg.group_size, clusters).reshape(-1)  # each weight's cell
    out = torch.bincount(cell, minlength=n).to(torch.float64)[:, None] * torch.arange(max_bits + 1, dtype=torch.float64)
    grid = "laplace" if cfg.cvxq_grid == "laplace" else "affine"
    for b in range(max(lo, 1), max_bits + 1):
        q = mixed_rtn(W, torch.full(shape, b, dtype=torch.uint8), cfg, max_bits, None, clusters, grid)
        codes = q.codes.reshape(-1).to(torch.long).cpu()
        freq = torch.bincount(codes, minlength=1 << b).to(torch.float64)
        cost = -torch.log2(freq / codes.numel())
        out[:, b] = torch.zeros(n, dtype=torch.float64).index_add_(0, cell, cost[codes])
    return out


def column_cells(W: torch.Tensor, sens: torch.Tensor) -> torch.Tensor:
    """Distortion weight sum_r G_rj^2 (W_rj - mean_j)^2 of every column of W [out, in]."""
    W = W.to(torch.float64)
    sens = sens.to(torch.float64).expand(W.shape)
    return ((W - W.mean(0, keepdim=True)).square() * sens).sum(0)


def _layer_fixed_bits(rows: int, in_f: int, cfg: CompressConfig, bias: bool) -> float:
    """Bits a layer stores whatever its widths: bias, CLAQ row scales (packing padding not included)."""
    fixed = 16 * rows if bias else 0
    if cell_kind(cfg) == "cluster":
        fixed += 16 * rows  # qclusters
    if cell_kind(cfg) == "column":
        fixed += 16 * rows * n_scales(in_f, cfg)
    return fixed


def layer_stored_bits(widths: torch.Tensor, rows: int, in_f: int, cfg: CompressConfig, bias: bool,
                      clusters: torch.Tensor | None = None) -> int:
    """Exact bits the artifact stores for a layer with these widths (as `rdquant inspect` counts)."""
    if cell_kind(cfg) == "cluster":
        return (cluster_stored_bits(widths, clusters, width_bits(cfg.cvxq_max_bits), cfg.cvxq_grid == "uniform")
                + (16 * rows if bias else 0))
    if cell_kind(cfg) == "column":
        return layer_bits(rows, in_f, 1, widths.cpu().to(torch.long), torch.zeros(in_f, dtype=torch.long),
                          n_scales(in_f, cfg), bias, cfg.claq_codebook_bits)
    return stored_bits(widths, in_f, cfg.group_size, width_bits(cfg.cvxq_max_bits)) + (16 * rows if bias else 0)


@dataclass
class LayerInfo:
    name: str
    rows: int
    cols: int
    bias: bool  # stored with a bias (its own, or one added by bias correction)


def model_layers(model: nn.Module, cfg: CompressConfig) -> list[LayerInfo]:
    """The linears the pipeline will quantize, in order."""
    blocks_name, blocks = find_blocks(model)
    out = []
    for i, b in enumerate(blocks):
        for n, lin in block_linears(b, cfg.skip).items():
            out.append(LayerInfo(f"{blocks_name}.{i}.{n}", lin.out_features, lin.in_features,
                                 lin.bias is not None or cfg.bias_correction))
    return out


def dense_bytes(model: nn.Module, layers: list[LayerInfo], cfg: CompressConfig | None = None) -> int:
    """Bytes of everything the artifact stores outside the decoder linears (tied tensors once) plus a
    bound on the safetensors header: what --target-size-total leaves out of the quantized layers'
    budget. The embedding and head count at their quantized size when `cfg` quantizes them at a fixed
    width; when the allocation sets their width they are in the quantized budget instead (0 here)."""
    from ..vocab import allocated, vocab_stored_bytes

    q = {l.name for l in layers}
    vocab, vocab_total = vocab_stored_bytes(model, cfg) if cfg is not None else ({}, 0)
    if cfg is not None and allocated(cfg):
        vocab_total = 0
    seen: set[int] = set()
    total, count = vocab_total, len(vocab) * 3
    for name, t in model.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        if owner in q and leaf in ("weight", "bias"):
            continue
        if owner in vocab and leaf == "weight":
            continue
        key = id(t) if t.is_meta else t.data_ptr()  # a streamed run's blocks are on meta (no addresses)
        if key in seen and t.numel():
            continue
        seen.add(key)
        total += t.numel() * (2 if t.is_floating_point() else t.element_size())
        count += 1
    n_tensors = count + 6 * len(layers)
    return total + 256 * n_tensors + 4096


def quantized_params(model: nn.Module, layers: list[LayerInfo], cfg: CompressConfig) -> int:
    """Weights the allocation sets: the layers', and the embedding's and head's when it sets them too."""
    from ..vocab import allocated, vocab_params

    return sum(l.rows * l.cols for l in layers) + (vocab_params(model, cfg) if allocated(cfg) else 0)


def budget_bits(model: nn.Module, layers: list[LayerInfo], cfg: CompressConfig) -> float:
    """The all-in bits allowed by the target (--target-bits / -size / -size-total) for what the allocation
    sets: the quantized layers, and the embedding and head with --embed-bits auto."""
    n = quantized_params(model, layers, cfg)
    adapters = 8.0 * adapters_bytes(layers, cfg)  # low-rank adapters (--lowrank): fixed, out of the codes' share
    if cfg.target_bits is not None:
        return cfg.target_bits * n - adapters
    if cfg.target_size is not None:
        return 8.0 * cfg.target_size - adapters
    if cfg.target_size_total is not None:
        rest = dense_bytes(model, layers, cfg)
        if cfg.target_size_total <= rest:
            raise RdquantError(f"--target-size-total {cfg.target_size_total:,} bytes is below what stays in 16 bit "
                               f"({rest:,} bytes: embeddings, norms, ...)")
        return 8.0 * (cfg.target_size_total - rest) - adapters
    return cfg.bits * n - adapters


def adapters_bytes(layers: list[LayerInfo], cfg: CompressConfig) -> int:
    """Stored bytes of every layer's low-rank adapters (0 without --lowrank)."""
    from ..lowrank import adapter_nbytes

    return sum(adapter_nbytes(l.cols, l.rows, cfg) for l in layers)


def grid_kappa(n: int, max_bits: int, clip_search: int, max_shrink: float, samples: int = 4000) -> torch.Tensor:
    """Distortion per unit variance of the asymmetric uniform grid (min-max with clip search, zero point an
    integer code, as `grid.group_grid` makes it) at widths 0..max_bits, measured on cells of n standardised
    Laplace samples (weights are heavier-tailed than Gaussian). Unlike Lloyd-Max, 1 bit is nearly useless
    here (one of the two levels is always 0), which the allocation must know."""
    from ..grid import group_grid, quantize_dequantize

    g = torch.Generator().manual_seed(0)
    u = torch.rand(samples, n, generator=g, dtype=torch.float64).clamp(1e-12, 1 - 1e-12) - 0.5
    X = -torch.sign(u) * torch.log1p(-2 * u.abs())  # Laplace(0, 1)
    X = ((X - X.mean(1, keepdim=True)) / X.std(1, keepdim=True)).to(torch.float32)
    k = [1.0]
    for b in range(1, max_bits + 1):
        s, z = group_grid(X, b, False, -1, clip_search, max_shrink)
        k.append(float((quantize_dequantize(X, s, z, b)[1] - X).square().mean()))
    return torch.tensor(k, dtype=torch.float64)


def layer_cells(W: torch.Tensor, sens: torch.Tensor, l: LayerInfo, cfg: CompressConfig
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One layer's share of the allocation, on the CPU: (distortion weight per cell, rate [cells,
    max_bits + 1] in bits, row clusters or None). All the allocation keeps of a layer, so a streamed
    run computes it while the layer's block is loaded and drops the weights and sensitivities."""
    mb, lo = cfg.cvxq_max_bits, min_bits(cfg)
    coded = cfg.cvxq_rate == "coded"
    nominal = torch.arange(mb + 1, dtype=torch.float64)[None, :]
    sens = sens.to(W.device)
    c = None
    if cell_kind(cfg) == "cluster":
        c = row_clusters(W, sens, cfg.group_size)
        w, sizes = cluster_cells(W, sens, c)
        w, sizes = w.cpu(), sizes.cpu()
        r = group_rates(sizes, mb, width_bits(mb), None, cfg.cvxq_grid == "uniform")
        if coded:  # the codes' share of the rate at their entropy instead of b bits each
            r = r - sizes[:, None] * nominal + coded_code_bits(W.cpu(), cfg, lo, mb, c)
    elif cell_kind(cfg) == "column":
        w = column_cells(W, sens).cpu()
        r = codebook_rates(l.rows, torch.ones(l.cols), mb, cfg.claq_codebook_bits)
    else:
        w, sizes, grids = (t.cpu() for t in width_cells(W, sens, cfg))
        r = group_rates(sizes, mb, width_bits(mb), grids)
        if coded:
            r = r - sizes[:, None] * nominal + to_width_cells(coded_code_bits(W.cpu(), cfg, lo, mb), l.rows, l.cols, cfg)
    return w, (r if coded else r.to(torch.float32)), c  # stored bit counts are exact in float32


PAD_BITS = 2 * 8 * sum(range(1, 9)) + 8 * 8  # a layer's packing padding is below this: codes and zeros per width, widths


def allocate(model: nn.Module, layers: list[LayerInfo], sens: dict[str, torch.Tensor] | None, cfg: CompressConfig,
             budget: float, progress: bool = False,
             cells: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] | None = None,
             vocab: list[tuple[str, float, torch.Tensor]] | None = None, gain_out: list[float] | None = None,
             ) -> tuple[dict[str, torch.Tensor], int, dict[str, torch.Tensor], dict[str, int]]:
    """Global reverse water-filling: (widths per layer, their bits <= `budget`, row clusters per layer
    with cluster cells, widths of the vocabulary matrices). The bits are the exact stored bits, or with
    --rate coded the modelled coded bits (codes at their per-width entropy, side information as stored).
    Each layer's cells come from `cells` (layer_cells, computed earlier) or from the model's weights and
    `sens`; `vocab` (VocabSensitivity.cells) adds one cell per embedding / head matrix, at least
    vocab.MIN_BITS wide. `gain_out` receives the price of a bit: the most distortion one more bit would
    still save in any cell (the best upgrade the budget did not buy)."""
    from ..vocab import MIN_BITS
    from tqdm.auto import tqdm

    mb = cfg.cvxq_max_bits
    kap = kappa(mb)
    if cell_kind(cfg) == "group" and cfg.cvxq_kappa == "grid":
        cell = min(l.cols for l in layers) if cfg.group_size == -1 else cfg.group_size
        kap = grid_kappa(cell, mb, cfg.clip_search, cfg.max_shrink)
    coded = cfg.cvxq_rate == "coded"
    lo = min_bits(cfg)  # widths below it are not offered
    weights, rates, spans = [], [], []
    clusters: dict[str, torch.Tensor] = {}
    fixed = 0.0
    for l in tqdm(layers, desc="cvxq: coded rates", unit="layer", disable=not (coded and progress)):
        if cells is not None:
            w, r, c = cells[l.name]
        else:
            w, r, c = layer_cells(model.get_submodule(l.name).weight.data, sens[l.name], l, cfg)
        if c is not None:
            clusters[l.name] = c
        fixed += _layer_fixed_bits(l.rows, l.cols, cfg, l.bias)
        spans.append(w.numel())
        weights.append(w)
        rates.append(r)
    vocab = vocab or []
    for _, w, r in vocab:
        weights.append(torch.tensor([w], dtype=torch.float64))
        rates.append(r[None, :].to(rates[0].dtype))  # float32 rounds it by a few bits; the exact fit below does not
    n_layer_cells = sum(spans)
    weight = torch.cat(weights)
    rate = torch.cat([r[:, lo:] for r in rates])  # one copy of the rate tables: an 8B model has 54M cells
    del weights, rates
    kap = kap[lo:]
    floor = max(MIN_BITS - lo, 0)  # the vocabulary cells' narrowest width offered (cells from n_layer_cells on)
    avail = budget - fixed
    if avail < float(rate[:, 0].sum(dtype=torch.float64)):
        n = quantized_params(model, layers, cfg) if vocab else sum(l.rows * l.cols for l in layers)
        raise RdquantError(
            f"the target ({budget / n:.3f} bits/weight for the quantized weights) is below the smallest "
            f"possible size ({(float(rate[:, 0].sum(dtype=torch.float64)) + fixed) / n:.3f} bits/weight: every cell at width {lo})")
    # the rate model leaves out packing padding (under PAD_BITS a layer): on a large model that is set aside
    # up front, so the exact count below fits at once (each recount costs a pass over every cell)
    reserve = PAD_BITS * len(layers) if PAD_BITS * len(layers) < 1e-4 * avail else 0.0
    table = Cells(weight, rate, kap, cfg.device)  # on the device: 13 bytes a cell for uniform grids
    del weight, rate
    flat = table.waterfill(avail - reserve)
    flat[n_layer_cells:].clamp_(min=floor)

    def vocab_widths(flat: torch.Tensor) -> dict[str, int]:
        return {name: int(b) + lo for (name, _, _), b in zip(vocab, flat[n_layer_cells:].tolist())}

    def on_cpu(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in out.items()}

    def unflatten(flat: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for l, piece in zip(layers, torch.split(flat[:n_layer_cells] + lo, spans)):
            if cell_kind(cfg) == "column":
                out[l.name] = piece.to(torch.uint8)
            elif cell_kind(cfg) == "cluster":
                out[l.name] = piece.to(torch.uint8).view(-1, l.cols)
            else:
                n_g = num_groups(l.cols, cfg.group_size)
                w = piece.to(torch.uint8).view(l.rows, -1)
                out[l.name] = w.repeat_interleave(cells_per_width(l.cols, cfg), 1)[:, :n_g].contiguous()
        return out

    if coded:  # a model of the coded size: no exact count to fit (the artifact's coded size is reported)
        return on_cpu(unflatten(flat)), int(fixed + table.total(flat)), clusters, vocab_widths(flat)
    # measure the exact size and, if it is over, narrow the cells that lose least per bit saved until it fits
    for _ in range(50):
        out = unflatten(flat)
        total = sum(layer_stored_bits(out[l.name], l.rows, l.cols, cfg, l.bias, clusters.get(l.name)) for l in layers)
        total += sum(int(r[lo + b]) for (_, _, r), b in zip(vocab, flat[n_layer_cells:].tolist()))  # exact, float64
        excess = total - budget
        if excess <= 0:
            if gain_out is not None:
                gain_out.append(table.price(flat))
            return on_cpu(out), total, clusters, vocab_widths(flat)
        flat = table.narrow(flat, excess, n_layer_cells, floor)
    raise RdquantError("cvxq: could not fit the allocation into the budget")  # pragma: no cover


def plan(model: "nn.Module | BlockSource", calib_ids: torch.Tensor | None, cfg: CompressConfig,
         progress: bool = True) -> CvxqPlan:
    """Sensitivities + one global lambda: the widths of every quantized layer (before quantizing)."""
    import time

    from ..sensitivity import blockwise_gradient_sensitivity, gradient_sensitivity, hessian_sensitivity
    from ..source import BlockSource
    from ..vocab import VocabSensitivity, allocated

    from ..lowrank import rank_options

    source = model if isinstance(model, BlockSource) else None
    model = source.model if source is not None else model
    mix = cell_kind(cfg) in MENU_KINDS
    auto = cfg.lowrank == -1  # adapters' ranks priced against bits by the allocation
    options: dict[str, list[tuple[int, float, float]]] = {}

    t0 = time.perf_counter()
    if calib_ids is None:
        raise RdquantError("cvxq needs calibration data for its sensitivities")
    layers = model_layers(model, cfg)
    names = [l.name for l in layers]
    ids = calib_ids[: cfg.cvxq_samples]
    # --lowrank auto measures each rank's repair of the rounding error at the budget's mean width
    budget = budget_bits(model, layers, cfg)
    guess = min(max(round(budget / quantized_params(model, layers, cfg)), 2), cfg.cvxq_max_bits)
    cells = None
    objective = "pca" if cfg.cvxq_sensitivity == "gradient" else "fisher"
    vocab = VocabSensitivity(model, cfg) if allocated(cfg) else None
    if source is not None and source.streamed:  # one block at a time; only each layer's cells are kept
        if cfg.cvxq_sensitivity not in ("gradient", "fisher"):
            raise RdquantError(f"cvxq sensitivity {cfg.cvxq_sensitivity!r} needs the model in memory; a streamed "
                               "source supports gradient and fisher")
        by_name = {l.name: l for l in layers}
        cells = {}

        def reduce(i: int, block: nn.Module, sens: dict[str, torch.Tensor]) -> None:
            for n, s in sens.items():
                W = block.get_submodule(n.split(f".{i}.", 1)[1]).weight.data
                cells[n] = layermix.layer_costs(W, s, cfg, n) if mix else layer_cells(W, s, by_name[n], cfg)
                if auto:
                    options[n] = rank_options(W, s, cfg, guess)

        blockwise_gradient_sensitivity(source, ids, cfg.skip, cfg.cvxq_components, cfg.cvxq_stride, cfg.cvxq_batch,
                                       cfg.device, cfg.seed, progress, objective, on_block=reduce, vocab=vocab)
        sens = None
    elif cfg.cvxq_sensitivity in ("gradient", "fisher"):
        sens = gradient_sensitivity(model, ids, names, cfg.cvxq_components, cfg.cvxq_stride, cfg.cvxq_batch,
                                    cfg.device, cfg.seed, progress, objective, vocab=vocab)
    else:
        sens = hessian_sensitivity(model, ids, names, cfg.cvxq_batch, cfg.device, progress)
    t_sens = time.perf_counter() - t0
    if auto and sens is not None:
        options = {l.name: rank_options(model.get_submodule(l.name).weight.data, sens[l.name], cfg, guess)
                   for l in layers}
    if mix:  # one llama.cpp type per layer (layermix.py)
        costs = cells if cells is not None else {
            l.name: layermix.layer_costs(model.get_submodule(l.name).weight.data, sens[l.name], cfg, l.name) for l in layers}
        fixed = sum(16 * l.rows for l in layers if l.bias)
        types, total = layermix.allocate(costs, budget - fixed, lambda name: layermix.fused_key(name, cfg))
        n = quantized_params(model, layers, cfg)
        summary = {l.name: layermix.type_bits(types[l.name], l.rows, l.cols, cfg) / (l.rows * l.cols) for l in layers}
        phases = {"sensitivity": round(t_sens, 2), "allocation": round(time.perf_counter() - t0 - t_sens, 2)}
        return CvxqPlan({}, budget / n, (total + fixed) / n, cfg.cvxq_sensitivity, cell_kind(cfg),
                        time.perf_counter() - t0, summary, {}, phases, {}, types)
    vocab_cells = vocab.cells(objective, min(cfg.cvxq_components, int(model.config.hidden_size)), cfg.cvxq_max_bits) \
        if vocab is not None else None
    price: list[float] = []
    widths, total, clusters, vocab_widths = allocate(model, layers, sens, cfg, budget, progress, cells, vocab_cells,
                                                     price)
    ranks: dict[str, int] = {}
    if auto:  # a rank where it saves more than the same bits would as widths, then the widths in what is left
        spent = 0.0
        for name, opts in options.items():
            r, bits, saved = max(opts, key=lambda o: o[2] - price[0] * o[1])
            if saved - price[0] * bits > 0:
                ranks[name], spent = r, spent + bits
        if spent:
            widths, total, clusters, vocab_widths = allocate(model, layers, sens, cfg, budget - spent, progress, cells,
                                                             vocab_cells)
            total += int(spent)
    if vocab is not None and vocab.tied and vocab.head_name:
        vocab_widths[vocab.head_name] = vocab_widths[vocab.emb_name]
    phases = {"sensitivity": round(t_sens, 2), "allocation": round(time.perf_counter() - t0 - t_sens, 2)}
    n = quantized_params(model, layers, cfg)
    summary = {}
    for l in layers:
        w = widths[l.name].to(torch.float64)
        if cell_kind(cfg) == "group":
            w = (w * group_sizes(l.cols, cfg.group_size)[None, :]).sum(1) / l.cols
        elif cell_kind(cfg) == "cluster":
            w = w[clusters[l.name].to(torch.long)]
        summary[l.name] = round(float(w.mean()), 4)
    summary.update({name: float(b) for name, b in vocab_widths.items()})
    return CvxqPlan(widths, budget / n, total / n, cfg.cvxq_sensitivity, cell_kind(cfg),
                    time.perf_counter() - t0, summary, clusters, phases, vocab_widths, ranks=ranks)


def cvxq_quantize(W: torch.Tensor, H: torch.Tensor, cfg: CompressConfig, state: CvxqPlan,
                  parts: tuple[tuple[int, bool], ...], names: list[str]) -> tuple[Any, list[str]]:
    """Quantize the stacked layers `names` at their planned widths with the configured solver."""
    missing = [n for n in names if n not in (state.types or state.widths)]
    if missing:
        raise RdquantError(f"cvxq: no allocation for {missing[0]} (the plan was made for another model?)")
    if state.types:  # a GGUF mix: each layer in its type's grid
        q, notes = layermix.quantize(W, H, cfg, [state.types[n] for n in names], parts)
        return q, [f"{state.cells} choices: " + ", ".join(f"{n.rpartition('.')[2]} {state.types[n]}" for n in names), *notes]
    note = "cvxq widths: " + ", ".join(f"{n.rpartition('.')[2]} {state.summary.get(n, math.nan):.3f}" for n in names)
    if cfg.lowrank == -1:
        note += "; --lowrank auto: " + ", ".join(f"{n.rpartition('.')[2]} rank {state.ranks.get(n, 0)}" for n in names) \
            + ("" if any(state.ranks.get(n) for n in names) else " (bits pay more than adapters here)")
    if cfg.cvxq_solver == "claq":
        q, notes = claq_quantize(W, H, cfg, parts, column_widths=[state.widths[n].to(torch.long) for n in names])
        return q, [note, *notes]
    widths = torch.cat([state.widths[n] for n in names]).to(torch.long)
    clusters = None
    grid = "laplace" if cfg.cvxq_grid == "laplace" else "affine"
    if state.cells == "cluster":  # stacked layers: each keeps its own clusters, numbered on
        offsets = torch.cumsum(torch.tensor([0] + [state.widths[n].shape[0] for n in names[:-1]]), 0)
        clusters = torch.cat([state.clusters[n].to(torch.long) + int(o) for n, o in zip(names, offsets)])
    if cfg.cvxq_solver == "gptq":
        q, notes = gptq_quantize(W, H, cfg, widths=widths, max_width=cfg.cvxq_max_bits, clusters=clusters,
                                 companded=grid == "laplace")
        return q, [note, *notes]
    h_diag = torch.diagonal(H).clone() if H is not None else None
    return mixed_rtn(W, widths, cfg, cfg.cvxq_max_bits, h_diag, clusters, grid), [note]


def smallest_bits(model: nn.Module, cfg: CompressConfig) -> tuple[float, float]:
    """(smallest all-in bits the quantized layers can take, bits the target allows), from the shapes
    alone: every cell at the narrowest width offered, all side information counted (with --rate coded
    the codes may code to nearly nothing, so only the side information). For claq with --target-bits
    the same per layer; checked before calibration so an impossible target fails at once. With the
    embedding and head in the allocation, their narrowest width counts too."""
    from ..vocab import MIN_BITS, allocated, vocab_stored_bytes

    layers = model_layers(model, cfg)
    n = quantized_params(model, layers, cfg)
    total = 8.0 * vocab_stored_bytes(model, cfg.replace(embed_bits=MIN_BITS))[1] if allocated(cfg) else 0.0
    total += 8.0 * adapters_bytes(layers, cfg)
    for l in layers:
        if cell_kind(cfg) in MENU_KINDS:
            types = layermix.menu(l.cols, cfg)
            if not types:
                raise RdquantError(f"{l.name}: its {l.cols} input columns are not a multiple of 32, so no GGUF type "
                                   "holds it; compress without --grid gguf")
            total += min(layermix.type_bits(t, l.rows, l.cols, cfg) for t in types) + (16 * l.rows if l.bias else 0)
            continue
        if cfg.method == "claq":
            share = cfg.claq_share
            n_g = -(-l.cols // share)
            total += layer_bits(l.rows, l.cols, share, torch.zeros(n_g, dtype=torch.long), torch.zeros(l.cols, dtype=torch.long),
                                n_scales(l.cols, cfg), l.bias, cfg.claq_codebook_bits)
            continue
        lo = min_bits(cfg)
        clusters = None
        if cell_kind(cfg) == "cluster":
            clusters = (torch.arange(l.rows) // (l.rows if cfg.group_size == -1 else cfg.group_size)).to(torch.int16)
            widths = torch.full((int(clusters.max()) + 1, l.cols), lo, dtype=torch.uint8)
        elif cell_kind(cfg) == "column":
            widths = torch.full((l.cols,), lo, dtype=torch.uint8)
        else:
            widths = torch.full((l.rows, num_groups(l.cols, cfg.group_size)), lo, dtype=torch.uint8)
        bits = layer_stored_bits(widths, l.rows, l.cols, cfg, l.bias, clusters)
        total += bits - (lo * l.rows * l.cols if cfg.cvxq_rate == "coded" else 0)
    if cfg.method == "claq" or cfg.target_bits is not None:
        budget = (cfg.target_bits or 0.0) * n
    elif cfg.target_size is not None:
        budget = 8.0 * cfg.target_size
    else:
        budget = 8.0 * ((cfg.target_size_total or 0) - dense_bytes(model, layers, cfg))
    return total, budget


def check_target(model: nn.Module, cfg: CompressConfig) -> None:
    """Refuse a size target below the smallest size the method can store (one rule for claq and cvxq)."""
    if cfg.method not in ("claq", "cvxq") or (cfg.method == "claq" and cfg.target_bits is None):
        return
    smallest, budget = smallest_bits(model, cfg)
    if budget >= smallest:
        return
    n = quantized_params(model, model_layers(model, cfg), cfg)
    if cfg.target_bits is not None:
        what = f"--target-bits {cfg.target_bits}"
    elif cfg.target_size is not None:
        what = f"--target-size {cfg.target_size:,} bytes"
    else:
        rest = dense_bytes(model, model_layers(model, cfg), cfg)
        what = (f"--target-size-total {cfg.target_size_total:,} bytes (the smallest tensor file is "
                f"{smallest / 8 + rest:,.0f} bytes)")
    raise RdquantError(f"{what} cannot be met: the smallest {cfg.method} can store is {smallest / n:.3f} bits/weight "
                       f"({smallest / 8:,.0f} bytes of quantized weights, every cell at its narrowest width with its "
                       f"side information" + (f", {adapters_bytes(model_layers(model, cfg), cfg):,} of them the low-rank "
                                              "adapters" if cfg.lowrank > 0 else "")
                       + "); raise the target" + (" or lower --lowrank" if cfg.lowrank > 0 else ""))
