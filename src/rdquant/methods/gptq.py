"""GPTQ (Frantar et al., 2022): quantize W column by column, pushing each column's rounding error onto
the not-yet-quantized columns through the inverse Hessian of the layer-wise loss ||WX - QX||^2.

Symbols follow the paper: H = 2 X X^T / n, Hinv = upper Cholesky factor of (H + lambda I)^-1,
blocksize B (lazy batch updates), err = (w - q) / Hinv[j, j].
"""

from __future__ import annotations

import torch

from .. import kquant
from ..config import CompressConfig
from ..grid import cluster_grid, companded_quantize, grid_params, group_grid, max_code, mixed_group_grid, quantize
from ..memory import row_panels
from ..qmixed import MixedWeight, width_bits
from ..qtensor import QuantizedWeight, dequantize_codes, expand_groups, num_groups
from .rtn import rtn_quantize


def proxy_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T): the layer's output error on the calibration inputs, up to scale."""
    D = (W.to(torch.float32) - Q.to(torch.float32))
    return float(((D @ H.to(torch.float32)) * D).sum())


def inverse_hessian_cholesky(
    H: torch.Tensor, damp_percent: float, notes: list[str], tries: int = 6, perm: torch.Tensor | None = None
) -> torch.Tensor | None:
    """Upper Cholesky factor of (H + lambda I)^-1, lambda = damp_percent * mean(diag H), of H with rows and
    columns in the order `perm` when given (GPTQ's act-order).

    A Hessian that is not positive definite after damping gets 10x more damping, up to `tries`
    times (noted in the layer log); None if it never factors. H is left as it is. Memory: one [in, in]
    matrix besides H (0.8 GB at 14k inputs, 3.3 GB at 28k), what the function returns: the permuted copy is
    gathered into it a panel at a time, then factored, inverted and factored again in place. The work runs
    on its column-major view (the matrix is symmetric, so it is the same matrix), the layout LAPACK and
    cuSOLVER factor in place; torch copies a row-major `out=` through a temporary. The factor comes back in
    that column-major layout (rows are strided): factoring the upper triangle there is the very computation
    `torch.linalg.cholesky(Hinv, upper=True)` does on its own column-major copy, so the factor is bit-equal
    to it (the transpose of the lower factor differs in the last bits, enough to move GPTQ's rounding
    choices). (cuSOLVER's inverse still takes a working copy for its own step.)
    """
    diag = torch.diagonal(H)
    # the damping's scale: the mean diagonal, or (an indefinite H can have a mean <= 0) its largest magnitude;
    # summed in float64, where the order of the terms (H's layout, the permutation) does not change the sum
    scale = float(diag.to(torch.float64).mean())
    if not scale > 0:
        scale = float(diag.abs().max()) or 1.0
    damp = damp_percent * scale
    info = torch.zeros((), dtype=torch.int32, device=H.device)
    A = torch.empty_like(H, memory_format=torch.contiguous_format)
    B = A.mT  # column-major view of the same storage
    for attempt in range(tries):
        _gather(H, perm, A)
        A.diagonal().add_(damp)  # H + damp I without an identity matrix beside it
        torch.linalg.cholesky_ex(B, out=(B, info))  # B = L, H = L L^T
        if int(info) == 0:
            torch.cholesky_inverse(B, out=B)  # B = H^-1
            torch.linalg.cholesky_ex(B, upper=True, out=(B, info))  # B = U, upper, H^-1 = U^T U
            if int(info) == 0 and _finite(A):
                if attempt:
                    notes.append(f"Hessian not positive definite: damping raised to {damp:.3g}")
                return B
        damp = damp * 10 if damp > 0 else 0.01 * scale
    return None


def _gather(H: torch.Tensor, perm: torch.Tensor | None, out: torch.Tensor, panels: int = 8) -> None:
    """out = H[perm][:, perm] (H when perm is None), an eighth of the rows at a time: one advanced-indexing
    gather of the whole matrix holds a second full-size temporary."""
    if perm is None:
        out.copy_(H)
        return
    for a, b in row_panels(H.shape[0], panels):
        torch.index_select(H.index_select(0, perm[a:b]), 1, perm, out=out[a:b])


def _finite(t: torch.Tensor) -> bool:
    """torch.isfinite(t).all(), an eighth of the rows at a time (on the whole matrix it allocates ~2x its size)."""
    return all(bool(torch.isfinite(t[a:b]).all()) for a, b in row_panels(t.shape[0]))


class ColumnQuantizer:
    """What the GPTQ sweep asks of a quantizer: `begin_block(cols, W1)` once per lazy block (cols: the
    block's original column indices; W1 [b, rows]: the block's current, error-updated columns, which
    the sweep keeps updating in place), then `column(i, w) -> q` for the block's i-th column, returning
    the dequantized values the error is taken against (and recording the codes itself)."""

    def begin_block(self, cols: list[int], W1: torch.Tensor) -> None:  # pragma: no cover - interface
        pass

    def see_inverse(self, Hinv1: torch.Tensor) -> None:
        """The lazy block's inverse-Hessian factor, before begin_block (SparseGPT's mask reads its diagonal)."""

    def column(self, i: int, w: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def end_block(self) -> None:
        """Called after the block's last column (flush per-block buffers)."""

    def affine_block(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(scales, zeros, max codes) [b, rows] of the current block when every column's grid is affine
        and fixed before the block starts (what the fused kernel needs); None otherwise."""
        return None

    def set_block_codes(self, codes: torch.Tensor) -> None:
        """The codes [b, rows] the fused kernel chose for the current block."""
        self.C1 = codes

    def fused_block(self, kernels, W1: torch.Tensor, Hinv1: torch.Tensor) -> torch.Tensor | None:
        """Run the current lazy block with the fused kernels (module kernels.gptq_triton) and return
        its errors [b, rows] (W1 is left as it was), or None when this block needs the Python loop."""
        grid = self.affine_block()
        if grid is None:
            return None
        codes, err = kernels.gptq_block(W1, Hinv1, *grid)
        self.set_block_codes(codes)
        return err


def prepare_hessian(W: torch.Tensor, H: torch.Tensor, notes: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W, H, dead) in float32 with dead inputs (H_jj = 0) zeroed in W and set to 1 on H's diagonal. The
    inputs are not modified (copies are made only when there are dead inputs): callers must not edit W or H."""
    W = W.to(torch.float32)  # W and H are the caller's (H is shared by the stage's linears): copied only
    H = H.to(torch.float32)  # when edited below; the sweep works on its own permuted copy of W
    if not _finite(H):
        raise ValueError("Hessian has non-finite entries (NaN/Inf activations)")
    dead = torch.diagonal(H) == 0
    if bool(dead.all()):  # nothing to compensate with: callers fall back to plain rounding of W
        return W, H, dead
    if bool(dead.any()):
        notes.append(f"{int(dead.sum())} dead input columns set to 0")
        H, W = H.clone(), W.clone()
        H[dead, dead] = 1
        W[:, dead] = 0
    return W, H, dead


def _block_kernel(W: torch.Tensor, kernel: bool | None):
    """The fused lazy-block kernels (module kernels.gptq_triton) when asked, or by default on CUDA."""
    if kernel is False or (kernel is None and not W.is_cuda):
        return None
    try:
        from ..kernels import gptq_triton
    except ImportError:  # pragma: no cover - triton is missing: the Python loop does the same
        return None
    return gptq_triton


def gptq_sweep(
    W: torch.Tensor, H: torch.Tensor, quantizer: ColumnQuantizer, perm: torch.Tensor, block_size: int,
    damp_percent: float, notes: list[str], kernel: bool | None = None,
) -> bool:
    """The GPTQ column sweep in the order `perm`, one implementation for every grid (uniform groups,
    column codebooks, ...). W [out, in] is consumed. False if H could not be factored. A quantizer
    whose block is an affine grid fixed per column (`affine_block`) runs each lazy block as one fused
    kernel on CUDA (or when `kernel` is True; False forces the Python loop), as does one that runs its own
    fused block (`fused_block`, CLAQ's codebooks)."""
    fused = _block_kernel(W, kernel)
    cols = W.shape[1]
    W = W[:, perm]
    Hinv = inverse_hessian_cholesky(H, damp_percent, notes, perm=perm)
    if Hinv is None:
        return False
    order = perm.tolist()
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        # work on the transposed block [B, rows] so each column and each update row is contiguous
        W1 = W[:, i1:i2].t().contiguous()
        Hinv1 = Hinv[i1:i2, i1:i2].contiguous()  # the factor is column-major: the loop reads this block's rows
        quantizer.see_inverse(Hinv1)
        quantizer.begin_block(order[i1:i2], W1)
        Err1 = quantizer.fused_block(fused, W1, Hinv1) if fused is not None else None
        if Err1 is None:
            Err1 = torch.empty_like(W1)
            d = torch.diagonal(Hinv1).tolist()
            for i in range(i2 - i1):
                w = W1[i]
                err = (w - quantizer.column(i, w)) / d[i]
                W1[i + 1 :].addr_(Hinv1[i, i + 1 :], err, alpha=-1)
                Err1[i] = err
        quantizer.end_block()
        W[:, i2:].addmm_(Err1.t(), Hinv[i1:i2, i2:], alpha=-1)  # in place: no [rows, in] temporary
    return True


class _UniformColumns(ColumnQuantizer):
    """GPTQ's own quantizer: per-group affine grids, static (given up front) or set when the sweep
    reaches a group's first column. `bits`: one width, or a width per cell [rows, n_groups] (static)."""

    def __init__(self, cfg: CompressConfig, scales, zeros, static: bool, h_diag: torch.Tensor, rows: int, cols: int,
                 bits: "int | torch.Tensor | None" = None):
        self.cfg, self.static, self.h_diag = cfg, static, h_diag
        self.bits = cfg.bits if bits is None else bits
        assert static or not isinstance(self.bits, torch.Tensor), "mixed widths need static grids"
        self.G = cols if cfg.group_size == -1 else cfg.group_size
        self.scales, self.zeros = scales, zeros
        self.codes = torch.empty(rows, cols, dtype=torch.uint8, device=scales.device)

    def begin_block(self, cols: list[int], W1: torch.Tensor) -> None:
        self.cols, self.W1 = cols, W1
        self.C1 = torch.empty_like(W1, dtype=torch.uint8)  # the block's codes, one contiguous row per column
        self.group_of = [c // self.G for c in cols]
        if self.static:  # per-column grid of this block, gathered once
            self.S1 = self.scales[:, self.group_of].t().contiguous()
            self.Z1 = self.zeros[:, self.group_of].t().contiguous()
            if isinstance(self.bits, torch.Tensor):
                self.B1 = self.bits[:, self.group_of].t().contiguous()
        else:
            self.S1, self.Z1 = torch.empty_like(W1), torch.empty_like(W1)

    def column(self, i: int, w: torch.Tensor) -> torch.Tensor:
        cfg, G = self.cfg, self.G
        if not self.static and self.cols[i] % G == 0:
            k = self.group_of[i]
            wg = self.W1[i : i + G].t()
            cw = self.h_diag[k * G : k * G + wg.shape[1]]
            s, z = grid_params(wg, cfg.bits, cfg.symmetric, cfg.clip_search, cfg.max_shrink, cw, cfg.scale_bits)
            self.scales[:, k : k + 1], self.zeros[:, k : k + 1] = s, z
            self.S1[i : i + G] = self.scales[:, k]
            self.Z1[i : i + G] = self.zeros[:, k]
        s, z = self.S1[i], self.Z1[i]
        c = quantize(w, s, z, self.B1[i] if isinstance(self.bits, torch.Tensor) else self.bits)
        self.C1[i] = c
        return dequantize_codes(c, s, z)

    def end_block(self) -> None:
        self.codes[:, self.cols] = self.C1.t()

    def affine_block(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        if not self.static:
            return None
        if isinstance(self.bits, torch.Tensor):
            return self.S1, self.Z1, max_code(self.B1)
        return self.S1, self.Z1, torch.full_like(self.S1, max_code(self.bits))


class _ClusterColumns(ColumnQuantizer):
    """Row-cluster x column cells (CVXQ's): every column has a grid per row cluster at that cell's width,
    fitted when the sweep's lazy block starts, to the block's error-updated columns. `grid`: affine
    (uniform, with a zero point) or laplace (companded)."""

    def __init__(self, cfg: CompressConfig, widths: torch.Tensor, clusters: torch.Tensor, rows: int, cols: int,
                 grid: str = "affine"):
        self.cfg, self.widths, self.grid = cfg, widths, grid
        self.clusters = clusters.to(widths.device, torch.long)
        self.scales = torch.zeros(widths.shape, device=widths.device)
        self.zeros = torch.zeros(widths.shape, device=widths.device)
        self.codes = torch.empty(rows, cols, dtype=torch.uint8, device=widths.device)

    def begin_block(self, cols: list[int], W1: torch.Tensor) -> None:
        self.cols = cols
        wd = self.widths[:, cols]
        s, z = cluster_grid(W1.t(), wd, self.clusters, self.cfg.clip_search, self.cfg.max_shrink, self.grid == "laplace",
                            self.cfg.scale_bits)
        self.scales[:, cols], self.zeros[:, cols] = s, z
        per_row = lambda t: t[self.clusters].t().contiguous()  # [block, rows]
        self.S1, self.Z1, self.B1 = per_row(s), per_row(z), per_row(wd.to(torch.float32))
        self.C1 = torch.empty_like(W1, dtype=torch.uint8)

    def round(self, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, values) of w on this quantizer's grid kind."""
        if self.grid == "laplace":
            return companded_quantize(w, s, b)
        c = quantize(w, s, z, b)
        return c, dequantize_codes(c, s, z)

    def column(self, i: int, w: torch.Tensor) -> torch.Tensor:
        c, q = self.round(w, self.S1[i], self.Z1[i], self.B1[i])
        self.C1[i] = c
        return q

    def end_block(self) -> None:
        self.codes[:, self.cols] = self.C1.t()

    def affine_block(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        return None if self.grid == "laplace" else (self.S1, self.Z1, max_code(self.B1))

    def result(self, max_width: int) -> MixedWeight:
        return MixedWeight(self.codes, self.widths.to(torch.uint8), self.scales.to(torch.float16), self.zeros,
                           self.cfg.group_size, width_bits(max_width), self.clusters.to(torch.int16), self.grid)


class _KQuantColumns(ColumnQuantizer):
    """llama.cpp k-quant grids (kquant.py), one per 256-column super-block: fitted when the sweep reaches the
    super-block's first column, to its error-updated columns (the lazy block spans whole super-blocks), or
    given up front (`params`: static, for act-order)."""

    def __init__(self, kt: kquant.KType, cfg: CompressConfig, h_diag: torch.Tensor, rows: int, cols: int,
                 params: kquant.KParams | None = None):
        self.kt, self.cfg, self.h_diag, self.static = kt, cfg, h_diag, params is not None
        dev = h_diag.device
        n_sb = cols // kquant.QK
        self.params = params or kquant.KParams(
            torch.zeros(rows, n_sb, device=dev), torch.zeros(rows, n_sb, device=dev) if kt.has_min else None,
            torch.zeros(rows, n_sb * kt.n_sub, device=dev), torch.zeros(rows, n_sb * kt.n_sub, device=dev) if kt.has_min else None)
        self.codes = torch.empty(rows, cols, dtype=torch.uint8, device=dev)
        if self.static:
            self.A, self.B = self._columns(self.params)

    def _columns(self, p: kquant.KParams) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps and offsets [cols, rows] of grid p (one row per column, as the sweep reads them)."""
        a, b = p.step_offset(self.kt)
        return a.repeat_interleave(self.kt.sub, 1).t().contiguous(), b.repeat_interleave(self.kt.sub, 1).t().contiguous()

    def begin_block(self, cols: list[int], W1: torch.Tensor) -> None:
        self.cols, self.W1 = cols, W1
        self.C1 = torch.empty_like(W1, dtype=torch.uint8)
        if self.static:
            self.A1, self.B1 = self.A[cols], self.B[cols]
        else:
            self.A1, self.B1 = torch.empty_like(W1), torch.empty_like(W1)

    def column(self, i: int, w: torch.Tensor) -> torch.Tensor:
        c0 = self.cols[i]
        if not self.static and c0 % kquant.QK == 0:
            k, n, cfg = c0 // kquant.QK, self.kt.n_sub, self.cfg
            p = kquant.fit(self.W1[i : i + kquant.QK].t(), self.kt, self.h_diag[c0 : c0 + kquant.QK], cfg.clip_search,
                           cfg.max_shrink)
            self.params.d[:, k] = p.d[:, 0]
            self.params.sc[:, k * n : (k + 1) * n] = p.sc
            if self.kt.has_min:
                self.params.dmin[:, k] = p.dmin[:, 0]
                self.params.m[:, k * n : (k + 1) * n] = p.m
            self.A1[i : i + kquant.QK], self.B1[i : i + kquant.QK] = self._columns(p)
        a, b = self.A1[i], self.B1[i]
        c = kquant.codes_for(w, a, b, self.kt)
        self.C1[i] = c
        return kquant.values(c, a, b, self.kt)

    def end_block(self) -> None:
        self.codes[:, self.cols] = self.C1.t()


def kquant_gptq(W: torch.Tensor, H: torch.Tensor, cfg: CompressConfig) -> tuple[kquant.KQuantWeight, list[str]]:
    """GPTQ in a llama.cpp k-quant grid (`--grid gguf:TYPE`; W's rows whole 256-weight super-blocks): the sweep
    of gptq_quantize with _KQuantColumns (the Python loop: the fused kernel's rounding has integer zero points)."""
    kt = kquant.ktype(kquant.grid_type(cfg.grid))
    notes: list[str] = []
    W, H, dead = prepare_hessian(W, H, notes)
    rows, cols = W.shape
    h_diag = torch.diagonal(H).clone()
    rtn = lambda: kquant.quantize_rtn(W, kt.name, h_diag, cfg.clip_search, cfg.max_shrink)
    if bool(dead.all()):
        notes.append("all inputs are zero: fell back to RTN (plain rounding)")
        return rtn(), notes
    params = kquant.fit(W, kt, h_diag, cfg.clip_search, cfg.max_shrink) if cfg.act_order else None
    perm = torch.argsort(h_diag, descending=True) if cfg.act_order else torch.arange(cols, device=W.device)
    kq = _KQuantColumns(kt, cfg, h_diag, rows, cols, params)
    B = cfg.block_size if cfg.act_order else -(-cfg.block_size // kquant.QK) * kquant.QK
    if not gptq_sweep(W, H, kq, perm, B, cfg.damp_percent, notes, kernel=False):
        notes.append("Hessian could not be factored even with heavy damping: fell back to RTN (plain rounding)")
        return rtn(), notes
    return kquant.KQuantWeight(kq.codes, kq.params, kt.name), notes


def mixed_rtn(W: torch.Tensor, widths: torch.Tensor, cfg: CompressConfig, max_width: int = 8,
              col_weight: torch.Tensor | None = None, clusters: torch.Tensor | None = None,
              grid: str = "affine") -> MixedWeight:
    """Plain rounding of W [out, in] onto mixed-width cells, each with its own searched grid: row-group
    cells (widths [out, n_groups], col_weight-weighted error, e.g. H_jj) or, given `clusters`,
    row-cluster x column cells (widths [n_clusters, in]), on the uniform or (grid "laplace", cluster
    cells) the companded grid."""
    W = W.to(torch.float32)
    widths = widths.to(W.device)
    if clusters is not None:  # the whole matrix as one block of the cluster quantizer, no error feedback
        cq = _ClusterColumns(cfg, widths, clusters, *W.shape, grid=grid)
        cq.begin_block(list(range(W.shape[1])), W.t())
        cq.C1 = cq.round(W.t(), cq.S1, cq.Z1, cq.B1)[0].to(torch.uint8)
        cq.end_block()
        return cq.result(max_width)
    if grid == "laplace":
        raise ValueError("the companded grid needs row-cluster cells")
    scales, zeros = mixed_group_grid(W, widths, cfg.group_size, cfg.clip_search, cfg.max_shrink, col_weight, cfg.scale_bits)
    cell = lambda t: expand_groups(t, W.shape[1], cfg.group_size)
    codes = quantize(W, cell(scales), cell(zeros), cell(widths.to(torch.float32)))
    return MixedWeight(codes.to(torch.uint8), widths.to(torch.uint8), scales.to(torch.float16), zeros,
                       cfg.group_size, width_bits(max_width))


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    cfg: CompressConfig,
    grid: tuple[torch.Tensor, torch.Tensor] | None = None,
    widths: torch.Tensor | None = None,
    max_width: int = 8,
    clusters: torch.Tensor | None = None,
    companded: bool = False,
) -> tuple["QuantizedWeight | MixedWeight", list[str]]:
    """Quantize W [out, in] against Hessian H [in, in]; returns the weight and log notes.

    Dead inputs (H_jj = 0) get weight 0. With act_order, columns go by decreasing H_jj and the
    group grids are fixed up front from the original weights (static groups), so the stored layout
    stays in natural column order. Otherwise a group's grid is set when the sweep reaches its
    first column, from the error-updated weights (the block width is a multiple of the group size,
    so the whole group is up to date then). A given `grid` (scales, zeros [out, n_groups]) is used
    as a static grid instead (other methods' grids, e.g. ECSQ). Given `widths` [out, n_groups] (CVXQ's
    allocation, 0..max_width), every cell gets its own width on a static grid and the result is a
    MixedWeight; with `clusters` [out] too, the cells are row clusters x columns (widths [n_clusters, in])
    and each block's grids are fitted to its error-updated columns, uniform or (`companded`) CVXQ's
    Laplace-shaped grid.
    """
    if cfg.grid != "affine" and grid is None and widths is None:  # a llama.cpp k-quant grid, or its fallback
        if W.shape[1] % kquant.QK == 0:
            return kquant_gptq(W, H, cfg)
        cfg = kquant.fallback_config(cfg)
    cell_grid = "laplace" if companded else "affine"
    notes: list[str] = []
    W, H, dead = prepare_hessian(W, H, notes)
    rows, cols = W.shape
    h_diag = torch.diagonal(H).clone()
    if bool(dead.all()):
        notes.append("all inputs are zero: fell back to RTN (plain rounding)")
        return (rtn_quantize(W, cfg) if widths is None else mixed_rtn(W, widths, cfg, max_width, None, clusters, cell_grid)), notes
    perm = torch.argsort(h_diag, descending=True) if cfg.act_order else torch.arange(cols, device=W.device)
    if clusters is not None and widths is not None:
        cc = _ClusterColumns(cfg, widths.to(W.device), clusters, rows, cols, cell_grid)
        if not gptq_sweep(W, H, cc, perm, cfg.block_size, cfg.damp_percent, notes):
            notes.append("Hessian could not be factored even with heavy damping: fell back to RTN (plain rounding)")
            return mixed_rtn(W, widths, cfg, max_width, None, clusters, cell_grid), notes
        return cc.result(max_width), notes
    G = cols if cfg.group_size == -1 else cfg.group_size
    n_g = num_groups(cols, cfg.group_size)
    static = cfg.act_order or G >= cols or grid is not None or widths is not None
    bits: "int | torch.Tensor" = cfg.bits
    if widths is not None:
        widths = widths.to(W.device)
        scales, zeros = mixed_group_grid(W, widths, cfg.group_size, cfg.clip_search, cfg.max_shrink, h_diag, cfg.scale_bits)
        bits = widths.to(torch.float32)
    elif grid is not None:
        scales, zeros = grid[0].to(W.device, torch.float32), grid[1].to(W.device, torch.float32)
    elif static:
        scales, zeros = group_grid(
            W, cfg.bits, cfg.symmetric, cfg.group_size, cfg.clip_search, cfg.max_shrink, h_diag, cfg.scale_bits
        )
    else:
        scales = torch.zeros(rows, n_g, device=W.device)
        zeros = torch.zeros(rows, n_g, device=W.device)
    cq = _UniformColumns(cfg, scales, zeros, static, h_diag, rows, cols, bits)
    B = cfg.block_size if static else max(1, -(-cfg.block_size // G)) * G
    if not gptq_sweep(W, H, cq, perm, B, cfg.damp_percent, notes):
        notes.append("Hessian could not be factored even with heavy damping: fell back to RTN (plain rounding)")
        return (rtn_quantize(W, cfg) if widths is None else mixed_rtn(W, widths, cfg, max_width, h_diag)), notes
    if widths is not None:
        return MixedWeight(cq.codes, widths.to(torch.uint8), scales.to(torch.float16), zeros, cfg.group_size,
                           width_bits(max_width)), notes
    qw = QuantizedWeight(
        codes=cq.codes,
        scales=scales.to(torch.float16),
        zeros=None if cfg.symmetric else zeros.to(torch.uint8),
        bits=cfg.bits,
        group_size=cfg.group_size,
    )
    return qw, notes
