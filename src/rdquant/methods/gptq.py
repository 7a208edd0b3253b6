"""GPTQ (Frantar et al., 2022): quantize W column by column, pushing each column's rounding error onto
the not-yet-quantized columns through the inverse Hessian of the layer-wise loss ||WX - QX||^2.

Symbols follow the paper: H = 2 X X^T / n, Hinv = upper Cholesky factor of (H + lambda I)^-1,
blocksize B (lazy batch updates), err = (w - q) / Hinv[j, j].
"""

from __future__ import annotations

import torch

from ..config import CompressConfig
from ..grid import grid_params, group_grid, quantize
from ..qtensor import QuantizedWeight, dequantize_codes, num_groups
from .rtn import rtn_quantize


def proxy_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T): the layer's output error on the calibration inputs, up to scale."""
    D = (W.to(torch.float32) - Q.to(torch.float32))
    return float(((D @ H.to(torch.float32)) * D).sum())


def inverse_hessian_cholesky(
    H: torch.Tensor, damp_percent: float, notes: list[str], tries: int = 6
) -> torch.Tensor | None:
    """Upper Cholesky factor of (H + lambda I)^-1, lambda = damp_percent * mean(diag H).

    A Hessian that is not positive definite after damping gets 10x more damping, up to `tries`
    times (noted in the layer log); None if it never factors.
    """
    mean_diag = float(torch.diagonal(H).mean())
    damp = damp_percent * mean_diag
    eye = torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
    for attempt in range(tries):
        L, info = torch.linalg.cholesky_ex(H + damp * eye)
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0 and torch.isfinite(U).all():
                if attempt:
                    notes.append(f"Hessian not positive definite: damping raised to {damp:.3g}")
                return U
        damp = damp * 10 if damp > 0 else 0.01 * mean_diag
    return None


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    cfg: CompressConfig,
    grid: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[QuantizedWeight, list[str]]:
    """Quantize W [out, in] against Hessian H [in, in]; returns the weight and log notes.

    Dead inputs (H_jj = 0) get weight 0. With act_order, columns go by decreasing H_jj and the
    group grids are fixed up front from the original weights (static groups), so the stored layout
    stays in natural column order. Otherwise a group's grid is set when the sweep reaches its
    first column, from the error-updated weights (the block width is a multiple of the group size,
    so the whole group is up to date then). A given `grid` (scales, zeros [out, n_groups]) is used
    as a static grid instead (other methods' grids, e.g. ECSQ).
    """
    notes: list[str] = []
    W = W.to(torch.float32).clone()
    H = H.to(torch.float32).clone()
    rows, cols = W.shape
    if not torch.isfinite(H).all():
        raise ValueError("Hessian has non-finite entries (NaN/Inf activations)")
    dead = torch.diagonal(H) == 0
    if bool(dead.all()):
        notes.append("all inputs are zero: fell back to RTN")
        return rtn_quantize(W, cfg), notes
    if bool(dead.any()):
        notes.append(f"{int(dead.sum())} dead input columns set to 0")
    H[dead, dead] = 1
    W[:, dead] = 0
    h_diag = torch.diagonal(H).clone()

    G = cols if cfg.group_size == -1 else cfg.group_size
    n_g = num_groups(cols, cfg.group_size)
    scales = torch.zeros(rows, n_g, device=W.device)
    zeros = torch.zeros(rows, n_g, device=W.device)

    def set_group(k: int, w_group: torch.Tensor) -> None:
        cw = h_diag[k * G : k * G + w_group.shape[1]]
        s, z = grid_params(w_group, cfg.bits, cfg.symmetric, cfg.clip_search, cfg.max_shrink, cw)
        scales[:, k : k + 1], zeros[:, k : k + 1] = s, z

    static = cfg.act_order or G >= cols or grid is not None
    if grid is not None:
        scales, zeros = grid[0].to(W.device, torch.float32), grid[1].to(W.device, torch.float32)
    elif static:
        scales, zeros = group_grid(
            W, cfg.bits, cfg.symmetric, cfg.group_size, cfg.clip_search, cfg.max_shrink, h_diag
        )
    perm = torch.argsort(h_diag, descending=True) if cfg.act_order else torch.arange(cols, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    group_of = (perm // G).tolist()  # group of the column at each sweep position

    Hinv = inverse_hessian_cholesky(H, cfg.damp_percent, notes)
    if Hinv is None:
        notes.append("Hessian could not be factored even with heavy damping: fell back to RTN")
        return rtn_quantize(W[:, torch.argsort(perm)], cfg), notes

    B = cfg.block_size if static else max(1, -(-cfg.block_size // G)) * G
    codes = torch.empty(rows, cols, dtype=torch.uint8, device=W.device)
    for i1 in range(0, cols, B):
        i2 = min(i1 + B, cols)
        # work on the transposed block [B, rows] so each column and each update row is contiguous
        W1 = W[:, i1:i2].t().contiguous()
        Err1 = torch.empty_like(W1)
        C1 = torch.empty_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diagonal(Hinv1).tolist()
        if static:  # per-column grid of this block, gathered once
            S1 = scales[:, group_of[i1:i2]].t().contiguous()
            Z1 = zeros[:, group_of[i1:i2]].t().contiguous()
        else:
            S1, Z1 = torch.empty_like(W1), torch.empty_like(W1)
        for i in range(i2 - i1):
            j = i1 + i
            if not static and j % G == 0:
                k = group_of[j]
                set_group(k, W1[i : i + G].t())
                S1[i : i + G] = scales[:, k]
                Z1[i : i + G] = zeros[:, k]
            w, s, z = W1[i], S1[i], Z1[i]
            c = quantize(w, s, z, cfg.bits)
            err = (w - dequantize_codes(c, s, z)) / d[i]
            C1[i] = c
            W1[i + 1 :].addr_(Hinv1[i, i + 1 :], err, alpha=-1)
            Err1[i] = err
        codes[:, i1:i2] = C1.t().to(torch.uint8)
        W[:, i2:] -= Err1.t() @ Hinv[i1:i2, i2:]

    codes = codes[:, torch.argsort(perm)]
    qw = QuantizedWeight(
        codes=codes,
        scales=scales.to(torch.float16),
        zeros=None if cfg.symmetric else zeros.to(torch.uint8),
        bits=cfg.bits,
        group_size=cfg.group_size,
    )
    return qw, notes
