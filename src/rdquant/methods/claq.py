"""CLAQ (Wang et al., 2024, arXiv 2405.17233): column-level K-means codebooks inside GPTQ's sweep,
outlier-guided adaptive precision per column, and outlier reservation in fp16.

Per input column j (an input channel: the `out` values W[:, j]) the codebook is the 1-D K-means of
the column *as the sweep reaches it* (after earlier columns' error feedback); entries snap to the
nearest centroid and the error is pushed onward exactly as in GPTQ (gptq.gptq_sweep). K-means is
batched: each lazy block's columns are clustered together when the block starts, and each column's
codebook is then refined by a few Lloyd steps on its up-to-date values when the sweep reaches it.

With `claq_entropy_lambda` > 0 the codes are entropy-constrained (kmeans.ec_refine): each value takes
the entry minimising distortion + mu x code length, the lengths those of its width's codes in the layer
so far (what one table per width, coding.segment_streams, pays), so the coded file shrinks for a
small rise in error.

Widths and reserved outliers come from a column precision policy (`plan_columns`): CLAQ's rule ranks
columns by their count of entries above `outlier_factor` x mean|W| and gives the top columns the high
width, as many as the all-in size target allows (codebooks, widths and outliers are counted). A later
global allocator can hand in its own widths instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import CompressConfig
from ..errors import RdquantError
from ..kmeans import ec_refine, kmeans_1d, nearest, rate_assign
from ..packing import packed_nbytes
from ..qcodebook import CodebookWeight, compact_codebooks, entries_of, index_dtype
from ..qtensor import group_sizes, num_groups
from .gptq import ColumnQuantizer, gptq_sweep, prepare_hessian

TOP_SHARE = 0.1  # CLAQ's outlier reservation: the top 10% of columns (by outlier count) ...
TOP_RATE = 3.5  # ... keep 3.5x the share of the others (CLAQ: 1.4% vs 0.4% per side)
# passes of the fused block (GPUs) when codebooks are refined or outliers chosen on the values as the
# sweep reaches them: each pass refines on the previous one's values. Layer error against the per-column
# loop, 9 random layers (3.1 / 2.2 bits, outliers): mean ratio 1.0035 with 2 passes, 1.0009 with 3,
# 0.9976 with 4 (range 0.988-1.002)
FUSED_PASSES = 4


@dataclass
class ColumnPlan:
    """One layer's per-column decisions: width of each codebook group and fp16 outliers per column."""

    widths: torch.Tensor  # [n_groups] long, bits per code
    outliers: torch.Tensor  # [in] long, entries kept in fp16 (largest half + smallest half)

    def bits(self, rows: int, in_features: int, cfg: CompressConfig, bias: bool = False) -> float:
        """All-in bits of the layer under this plan, as the artifact will store it."""
        return float(layer_bits(rows, in_features, cfg.claq_share, self.widths, self.outliers, n_scales(in_features, cfg),
                                bias, cfg.claq_codebook_bits))


def n_scales(in_f: int, cfg: CompressConfig) -> int:
    """fp16 row scales stored per row (0 without row scales)."""
    return num_groups(in_f, cfg.claq_scale_group) if cfg.claq_row_scale else 0


def layer_bits(rows: int, in_f: int, share: int, widths: torch.Tensor, outliers: torch.Tensor, scales_per_row: int,
               bias: bool = False, codebook_bits: int = 16) -> int:
    """Exact stored bits: packed codes per width, codebooks (fp16 values, or uint8 entries + fp16 lo and
    step each), uint8 widths, row scales, outliers, and the layer's 16-bit bias (counted with the
    layer, as `rdquant inspect` does)."""
    cols_per = torch.full_like(widths, share)
    cols_per[-1] = in_f - share * (widths.numel() - 1)
    total = 0
    for b in widths.unique().tolist():
        if b:
            total += 8 * packed_nbytes(rows * int(cols_per[widths == b].sum()), int(b))
    total += codebook_bits * int((torch.ones_like(widths) << widths).sum()) + 8 * widths.numel()
    total += 32 * widths.numel() if codebook_bits == 8 else 0
    total += 16 * rows * scales_per_row
    total += 16 * rows if bias else 0
    n = int(outliers.sum())
    if n:
        isz = 16 if index_dtype(rows) == torch.int16 else 32
        total += isz * in_f + (isz + 16) * n
    return total


def codebook_rates(rows: int, cols: torch.Tensor, max_bits: int, codebook_bits: int) -> torch.Tensor:
    """[n_groups, max_bits + 1] bits of a codebook group of `cols` columns at each width, as `layer_bits`
    counts them: codes, the codebook, its uint8 width and (8-bit codebooks) its fp16 (lo, step)."""
    b = torch.arange(max_bits + 1, dtype=torch.float64)
    side = codebook_bits * 2.0 ** b + 8 + (32 if codebook_bits == 8 else 0)
    return rows * cols.to(torch.float64)[:, None] * b[None, :] + side[None, :]


def outlier_counts(W: torch.Tensor, factor: float) -> torch.Tensor:
    """CLAQ's outlier score per column: entries with |w| > factor * mean|W| of the whole matrix."""
    return (W.abs() > factor * W.abs().mean()).sum(0)


def column_priority(W: torch.Tensor, h_diag: torch.Tensor, factor: float) -> torch.Tensor:
    """Columns, most deserving first: by outlier count, ties by output energy H_jj * ||W[:, j]||^2."""
    count = outlier_counts(W, factor).to(torch.float64)
    energy = (h_diag.to(torch.float64) * W.to(torch.float64).square().sum(0))
    energy = energy / energy.max().clamp_min(1e-300)  # in [0, 1], below one outlier step
    return torch.argsort(count + energy * 0.5, descending=True).cpu()


def plan_columns(W: torch.Tensor, h_diag: torch.Tensor, cfg: CompressConfig, bias: bool = False) -> ColumnPlan:
    """CLAQ's column precision policy (outlier-guided adaptive precision + outlier reservation). The
    per-column statistics are computed where W is (the GPU in a GPU run); the plan is on the CPU."""
    rows, in_f = W.shape
    share = cfg.claq_share
    n_g = -(-in_f // share)
    prio = column_priority(W, h_diag, cfg.claq_outlier_factor)
    # outlier reservation: top columns by outlier count keep TOP_RATE x the share of the others
    outliers = torch.zeros(in_f, dtype=torch.long)
    if cfg.claq_outlier_frac > 0:
        base = cfg.claq_outlier_frac / (TOP_SHARE * TOP_RATE + 1 - TOP_SHARE)
        rate = torch.full((in_f,), base, dtype=torch.float64)
        rate[prio[: int(round(TOP_SHARE * in_f))]] = base * TOP_RATE
        outliers = torch.round(rate * rows).to(torch.long).clamp(max=rows)
    # group priority: the best rank of its columns
    rank = torch.empty(in_f, dtype=torch.long)
    rank[prio] = torch.arange(in_f)
    g_rank = torch.full((n_g,), in_f, dtype=torch.long).scatter_reduce(0, torch.arange(in_f) // share, rank, "amin")
    g_order = torch.argsort(g_rank)
    if cfg.target_bits is None:
        return ColumnPlan(torch.full((n_g,), cfg.bits, dtype=torch.long), outliers)
    budget = cfg.target_bits * rows * in_f
    size = lambda widths: layer_bits(rows, in_f, share, widths, outliers, n_scales(in_f, cfg), bias, cfg.claq_codebook_bits)
    fits = lambda widths: size(widths) <= budget
    lo = next((b for b in range(8, -1, -1) if fits(torch.full((n_g,), b, dtype=torch.long))), None)
    if lo is None:
        raise RdquantError(
            f"--target-bits {cfg.target_bits} cannot be met for a {rows}x{in_f} layer even at width 0 "
            f"(side information alone is {size(torch.zeros(n_g, dtype=torch.long)) / (rows * in_f):.3f} bits/weight)"
        )
    if cfg.claq_policy == "rd":
        return ColumnPlan(_rd_widths(W, h_diag, cfg, outliers, budget - size(torch.zeros(n_g, dtype=torch.long))), outliers)
    widths = torch.full((n_g,), lo, dtype=torch.long)
    hi = cfg.claq_high_bits if cfg.claq_high_bits > lo else lo + 1
    if lo < 8:
        # promote groups in priority order while the budget holds (bisection on the count)
        a, z = 0, n_g
        while a < z:
            mid = (a + z + 1) // 2
            w = widths.clone()
            w[g_order[:mid]] = hi
            a, z = (mid, z) if fits(w) else (a, mid - 1)
        widths[g_order[:a]] = hi
    return ColumnPlan(widths, outliers)


def _rd_widths(W: torch.Tensor, h_diag: torch.Tensor, cfg: CompressConfig, outliers: torch.Tensor,
               budget: float) -> torch.Tensor:
    """Column precision by rate-distortion (allocate.waterfill): group g's distortion at width b is
    modelled as H_jj-weighted variance x kappa(b), its rate as codes + codebook at b; `budget` is what
    is left above the all-width-0 size."""
    rows, in_f = W.shape
    share = cfg.claq_share
    n_g = -(-in_f // share)
    Wc = W.to(torch.float64)
    var = (Wc - Wc.mean(0, keepdim=True)).square().sum(0).cpu()  # per column, summed over rows
    var = var * (1 - outliers.to(torch.float64) / rows).clamp_min(0)  # reserved entries cost nothing
    weight = torch.zeros(n_g, dtype=torch.float64).index_add_(0, torch.arange(in_f) // share,
                                                             var * h_diag.cpu().to(torch.float64))
    rate = codebook_rates(rows, group_sizes(in_f, share), 8, cfg.claq_codebook_bits)
    rate = rate - rate[:, :1]  # above the width-0 size
    from ..allocate import waterfill

    widths = waterfill(weight, rate, budget)
    total = lambda w: layer_bits(rows, in_f, share, w, outliers, n_scales(in_f, cfg), False, cfg.claq_codebook_bits)
    while budget >= 0 and total(widths) - total(torch.zeros_like(widths)) > budget and bool((widths > 0).any()):
        widths[int(torch.argmax(torch.where(widths > 0, -weight, -float("inf"))))] -= 1  # packing pad
    return widths


def _outlier_mask(X: torch.Tensor, valid: torch.Tensor, n_top: torch.Tensor, n_bot: torch.Tensor) -> torch.Tensor:
    """[N, m] mask of the n_top largest and n_bot smallest valid entries of each row of X."""
    if not bool((n_top > 0).any() or (n_bot > 0).any()):
        return torch.zeros_like(valid)
    # one ascending sort (invalid entries last): the first n_bot and the last n_top valid places
    order = torch.where(valid, X, float("inf")).argsort(1)
    pos = torch.arange(X.shape[1], device=X.device)[None, :]
    nv = valid.sum(1, keepdim=True)
    take = (pos < n_bot[:, None]) | ((pos >= nv - n_top[:, None]) & (pos < nv))
    return torch.zeros_like(valid).scatter_(1, order, take) & valid


class _CodebookColumns(ColumnQuantizer):
    """Column codebooks for a stack of layers (parts) that share the input: every part gets its own
    codebook per column (batched together), widths and outliers from its own plan."""

    def __init__(self, W: torch.Tensor, parts: list[tuple[int, int]], plans: list[ColumnPlan],
                 scales: list[torch.Tensor | None], cfg: CompressConfig, static: torch.Tensor | None = None):
        rows, cols = W.shape
        dev = W.device
        self.cfg, self.parts, self.plans = cfg, parts, plans
        P, m = len(parts), max(b - a for a, b in parts)
        self.idx = torch.zeros(P, m, dtype=torch.long, device=dev)
        self.valid = torch.zeros(P, m, dtype=torch.bool, device=dev)
        n_sg = max([1] + [s_.shape[1] for s_ in scales if s_ is not None])
        self.R = torch.ones(P, m, n_sg, device=dev)  # row scale of (part, row, scale group)
        for p, (a, b) in enumerate(parts):
            self.idx[p, : b - a] = torch.arange(a, b, device=dev)
            self.valid[p, : b - a] = True
            if scales[p] is not None:
                self.R[p, : b - a] = scales[p].to(dev, torch.float32)
        sg = cfg.claq_scale_group if cfg.claq_scale_group > 0 else cols
        self.sgroup = torch.arange(cols, device=dev) // sg  # the row-scale group of every column
        share = cfg.claq_share
        self.width = torch.stack([p.widths.repeat_interleave(share)[:cols] for p in plans]).to(dev)  # [P, in] bits
        self.k = 1 << self.width  # [P, in] codebook entries
        self.n_out = torch.stack([p.outliers for p in plans]).to(dev)  # [P, in]
        self.kmax = int(self.k.max())
        self.part = torch.arange(P, device=dev)
        self.pool = (torch.zeros(P, 9, self.kmax, dtype=torch.float64, device=dev)  # code counts per width so far
                     if cfg.claq_entropy_lambda > 0 else None)
        self.codes = torch.zeros(rows, cols, dtype=torch.uint8, device=dev)
        self.cb = torch.full((cols, P, self.kmax), float("inf"), device=dev)  # values as stored
        self.cb_range = torch.zeros(cols, P, 2, dtype=torch.float16, device=dev)  # 8-bit codebooks: lo, step
        self.out_mask = torch.zeros(rows, cols, dtype=torch.bool, device=dev)
        self.static = static  # [cols, P, kmax] fixed codebooks (shared codebooks), or None
        self.Q = W.clone()  # every column's dequantized values as returned to the sweep
        self.row_part = torch.zeros(rows, dtype=torch.int32, device=dev)  # the part of each row (fused kernel)
        self.row_scale = torch.ones(rows, n_sg, device=dev)  # the scale of each (row, scale group)
        for p, (a, b) in enumerate(parts):
            self.row_part[a:b] = p
            self.row_scale[a:b] = self.R[p, : b - a]
        self.any_outliers = bool((self.n_out > 0).any())

    def _prep(self, X: torch.Tensor, cols: torch.Tensor):
        """X [N, P, m] raw values of columns `cols` (LongTensor [N]) -> (normalised values, K-means
        weights, outlier mask, scales), all [N, P, m]."""
        N, P, m = X.shape
        r = self.R[:, :, self.sgroup[cols]].permute(2, 0, 1)  # [N, P, m]
        x = X / r
        if not self.any_outliers:
            return x, r.square() * self.valid, torch.zeros_like(x, dtype=torch.bool), r
        n = self.n_out[:, cols].t()  # [N, P]
        n_top, n_bot = ((n + 1) // 2).reshape(-1), (n // 2).reshape(-1)
        mask = _outlier_mask(X.reshape(N * P, m), self.valid.repeat(N, 1), n_top, n_bot).view(N, P, m)
        return x, r.square() * self.valid * ~mask, mask, r

    def begin_block(self, cols: list[int], W1: torch.Tensor) -> None:
        self.cols, self.cols_t = cols, torch.tensor(cols, device=W1.device)
        self.start_mask = None  # outliers among the block-start values (the fused block's first pass)
        if self.static is not None:
            self.block_cb = self.static[self.cols_t]
            return
        b = len(cols)
        x, w, self.start_mask, _ = self._prep(W1[:, self.idx], self.cols_t)
        P, m = self.idx.shape
        k = self.k[:, self.cols_t].t().reshape(-1)
        # no split-merge rounds here: the per-column refinement follows (rounds cost 3-5x, gain < 1%)
        with torch.profiler.record_function("claq: block k-means"):
            cb = kmeans_1d(x.reshape(b * P, m), k, w.reshape(b * P, m), iters=self.cfg.claq_kmeans_iters, rounds=0)
        self.block_cb = cb.view(b, P, -1)

    def column(self, i: int, w: torch.Tensor) -> torch.Tensor:
        j = self.cols[i]
        X = w[self.idx][None]  # [1, P, m]
        x, wt, mask, r = self._prep(X, self.cols_t[i : i + 1])
        x, wt, mask, r = x[0], wt[0], mask[0], r[0]
        cb = self.block_cb[i]
        if self.static is None and self.cfg.claq_refine_iters > 0:
            cb = kmeans_1d(x, self.k[:, j], wt, iters=self.cfg.claq_refine_iters, init=cb)
        lam = self.cfg.claq_entropy_lambda
        if lam > 0:  # entropy-constrained codes (shared codebooks stay as fitted; only the codes move); the
            # code lengths are those of the table the coder will use: every column of this width so far
            prior = self.pool[self.part, self.width[:, j], : cb.shape[1]]
            cb, code_bits, mu = ec_refine(x, cb, wt, self.valid, lam, iters=0 if self.static is not None else 6, prior=prior)
        cb = self._store_books(cb[None], self.cols_t[i : i + 1])[0]
        code = rate_assign(x, cb, wt, mu, code_bits) if lam > 0 else nearest(x, cb)
        if lam > 0:
            self.pool[self.part, self.width[:, j]] += torch.zeros_like(self.pool[:, 0]).scatter_add_(1, code, self.valid.double())
        q = cb.gather(1, code) * r
        q = torch.where(mask, X[0].to(torch.float16).to(torch.float32), q)
        out = torch.empty_like(w)
        v = self.valid
        out[self.idx[v]] = q[v]
        self.codes[self.idx[v], j] = code[v].to(torch.uint8)
        self.out_mask[self.idx[v], j] = mask[v]
        self.Q[:, j] = out
        return out

    def _store_books(self, cb: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Codebooks [b, P, k] of columns `cols` -> their values as stored (8-bit entries on an fp16 range,
        or fp16; inf stays inf), recorded for the artifact."""
        b, P, k = cb.shape
        if self.cfg.claq_codebook_bits == 8:
            vals, lo, step = compact_codebooks(cb.reshape(b * P, k))
            cb = vals.view(b, P, k)
            self.cb_range[cols, :, 0], self.cb_range[cols, :, 1] = lo.view(b, P), step.view(b, P)
        else:
            cb = cb.to(torch.float16).to(torch.float32)
        self.cb[cols, :, :k] = cb
        return cb

    def _full_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Outlier mask [b, P, m] per part -> [b, rows] over the stacked rows."""
        full = torch.zeros(mask.shape[0], self.codes.shape[0], dtype=torch.bool, device=mask.device)
        full[:, self.idx[self.valid]] = mask[:, self.valid]
        return full

    def fused_block(self, kernels, W1: torch.Tensor, Hinv1: torch.Tensor) -> torch.Tensor | None:
        """The block in the fused kernel, in FUSED_PASSES passes from the same start: the first, with the
        block-start codebooks, gives every column's values as the sweep reaches it; the codebooks are
        refined on those (the Lloyd steps `column` takes per column, batched) and the outliers chosen
        among them for the next pass. Entropy-constrained codes keep the Python loop (their code lengths
        move with every column)."""
        if self.cfg.claq_entropy_lambda > 0:
            return None
        cols, b = self.cols_t, len(self.cols)
        P, m = self.idx.shape
        scales = self.row_scale[:, self.sgroup[cols]].t()
        refine = self.static is None and self.cfg.claq_refine_iters > 0
        passes = FUSED_PASSES if refine else 2 if self.any_outliers else 1  # fixed codebooks: one pass finds the outliers
        mask = None
        if self.any_outliers:
            start = self.start_mask if self.start_mask is not None else self._prep(W1[:, self.idx], cols)[2]
            mask = self._full_mask(start)
        cb = self.block_cb
        for p in range(passes):
            if p:  # refine on the values the previous pass reached, choose the outliers among them
                x, wt, om, _ = self._prep(reached[:, self.idx], cols)
                if refine:
                    with torch.profiler.record_function("claq: refine k-means"):
                        cb = kmeans_1d(x.reshape(b * P, m), self.k[:, cols].t().reshape(-1), wt.reshape(b * P, m),
                                       iters=self.cfg.claq_refine_iters, init=cb.reshape(b * P, -1)).view(b, P, -1)
                mask = self._full_mask(om) if self.any_outliers else None
            # earlier passes only find the reached values: the codebooks as stored are needed in the last
            books = self._store_books(cb, cols) if p == passes - 1 else cb
            codes, err, reached, deq = kernels.codebook_block(W1, Hinv1, scales, books, self.row_part, mask)
        self.codes[:, cols] = codes.t()
        self.Q[:, cols] = deq.t()
        if mask is not None:
            self.out_mask[:, cols] = mask.t()
        return err

    def result(self, Q: torch.Tensor, scales: list[torch.Tensor | None]) -> list[CodebookWeight]:
        """Per-part weights; Q holds the final dequantized values (outliers read from it)."""
        res = []
        share = self.cfg.claq_share
        for p, ((a, b), plan) in enumerate(zip(self.parts, self.plans)):
            widths = plan.widths
            first = torch.arange(widths.numel()) * share  # each group's codebook = its first column's
            sizes = (1 << widths).tolist()
            rng = None
            if self.cfg.claq_codebook_bits == 8:
                rng = self.cb_range[first, p]  # [n_groups, 2]
                book = entries_of(self.cb[first, p], rng[:, 0], rng[:, 1])
                book = torch.cat([book[g, :s] for g, s in enumerate(sizes)])
            else:
                book = torch.cat([self.cb[c, p, :s] for c, s in zip(first.tolist(), sizes)]).to(torch.float16)
            mask = self.out_mask[a:b]
            wt = CodebookWeight(self.codes[a:b].clone(), widths.to(torch.uint8), book, share,
                                None if scales[p] is None else scales[p].to(torch.float16), codebook_range=rng,
                                scale_group=self.cfg.claq_scale_group)
            if bool(mask.any()):
                cr = torch.nonzero(mask.t())  # (col, row) sorted by column then row
                wt.outlier_count = mask.sum(0).to(index_dtype(b - a))
                wt.outlier_row = cr[:, 1].to(index_dtype(b - a))
                wt.outlier_val = Q[a:b][cr[:, 1], cr[:, 0]].to(torch.float16)
            res.append(wt)
        return res


def _row_scales(W: torch.Tensor, group: int) -> torch.Tensor:
    """fp16 row scales [rows, n_groups] (RMS of each row's group of columns); never zero."""
    rows, cols = W.shape
    G = cols if group == -1 else group
    n = num_groups(cols, group)
    pad = n * G - cols
    Wp = torch.cat([W, W.new_zeros(rows, pad)], 1) if pad else W
    cnt = torch.full((n,), float(G), device=W.device)
    cnt[-1] = G - pad
    r = (Wp.view(rows, n, G).square().sum(2) / cnt).sqrt()
    r = torch.where(r > 0, r, torch.ones_like(r)).to(torch.float16)
    return torch.where(r > 0, r, torch.ones_like(r))  # underflow to 0 in fp16


def _static_codebooks(W: torch.Tensor, cq: _CodebookColumns, h_diag: torch.Tensor, cfg: CompressConfig) -> torch.Tensor:
    """Shared codebooks (one per `share` columns) from the original weights, K-means weighted by
    H_jj (and row scale^2), computed up front: [cols, P, kmax] (each column gets its group's)."""
    rows, cols = W.shape
    share = cfg.claq_share
    n_g = -(-cols // share)
    P, m = cq.idx.shape
    x, w, _, _ = cq._prep(W.t()[:, cq.idx], torch.arange(cols, device=W.device))  # [cols, P, m]
    w = w * h_diag[:, None, None].clamp_min(0) if cfg.claq_hessian_weight else w
    pad = n_g * share - cols
    if pad:
        x = torch.cat([x, x.new_zeros(pad, P, m)], 0)
        w = torch.cat([w, w.new_zeros(pad, P, m)], 0)
    xg = x.view(n_g, share, P, m).permute(0, 2, 1, 3).reshape(n_g * P, share * m)
    wg = w.view(n_g, share, P, m).permute(0, 2, 1, 3).reshape(n_g * P, share * m)
    k = cq.k[:, ::share].t().reshape(-1)
    cb = kmeans_1d(xg, k, wg, iters=cfg.claq_kmeans_iters).view(n_g, P, -1)
    return cb.repeat_interleave(share, 0)[:cols]


def claq_quantize(
    W: torch.Tensor, H: torch.Tensor, cfg: CompressConfig, parts: tuple[tuple[int, bool], ...] | None = None,
    column_widths: list[torch.Tensor] | None = None,
) -> tuple[list[CodebookWeight], list[str]]:
    """CLAQ on W [out, in] stacking layers of parts (rows, has_bias) (one result per part). Given
    `column_widths` (one [in] tensor per part, from a global allocator), they replace the column policy."""
    notes: list[str] = []
    rows, cols = W.shape
    parts = parts or ((rows, False),)
    bounds = []
    a = 0
    for n, _ in parts:
        bounds.append((a, a + n))
        a += n
    W, H, dead = prepare_hessian(W, H, notes)
    h_diag = torch.diagonal(H).clone()
    if column_widths is not None:
        if cfg.claq_share != 1 or len(column_widths) != len(parts):
            raise RdquantError("claq: given column widths need one tensor per part and share 1")
        plans = [ColumnPlan(w.to(torch.long).cpu(), torch.zeros(cols, dtype=torch.long)) for w in column_widths]
    else:
        plans = [plan_columns(W[a:b], h_diag, cfg, bias) for (a, b), (_, bias) in zip(bounds, parts)]
    scales = [_row_scales(W[a:b], cfg.claq_scale_group) if cfg.claq_row_scale else None for a, b in bounds]
    cq = _CodebookColumns(W, bounds, plans, scales, cfg)
    if cfg.claq_share > 1:
        cq.static = _static_codebooks(W, cq, h_diag, cfg)
    perm = torch.argsort(h_diag, descending=True) if cfg.act_order else torch.arange(cols)
    ok = not bool(dead.all()) and gptq_sweep(W, H, cq, perm, cfg.block_size, cfg.damp_percent, notes)
    if not ok:  # no usable Hessian: codebooks and rounding without error feedback
        notes.append("no usable Hessian: column codebooks without error compensation")
        for i1 in range(0, cols, cfg.block_size):
            cs = list(range(i1, min(i1 + cfg.block_size, cols)))
            W1 = W[:, cs].t().contiguous()
            cq.begin_block(cs, W1)
            for i in range(len(cs)):
                cq.column(i, W1[i])
    widths = torch.cat([p.widths.repeat_interleave(cfg.claq_share)[:cols].float() for p in plans])
    notes.append(f"column widths {sorted(set(widths.long().tolist()))}, mean {float(widths.mean()):.3f}; "
                 f"{int(cq.out_mask.sum())} fp16 outliers")
    return cq.result(cq.Q, scales), notes
