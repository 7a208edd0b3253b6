"""SLiM's saliency low-rank adapters (Mozaffari et al. 2025), for any base method: a rank-r repair of
the error a quantized (and pruned) weight leaves, in closed form.

With s_j the input's mean square on channel j (diag H, up to scale), the error E = W - W_c is weighted
by sqrt(s) per input column, where the layer's output error lives; the top-r SVD of E diag(sqrt s) =
U S V^T gives the adapters D = S_r V_r^T diag(1/sqrt s) [r, in] and U_r [out, r], so that U_r D is the
saliency-weighted rank-r approximation of E. The base is then quantized again against W - U D
(pipeline.quantize_stage), so it absorbs what the adapters cannot hold.
"""

from __future__ import annotations

import math

import torch

from . import packing
from .adapters import LowRank
from .config import CompressConfig
from .qtensor import num_groups


def adapter_rank(fraction: float, in_features: int, out_features: int) -> int:
    """The rank for `fraction` of min(in, out), rounded up to a tile: 128 for layers at least 2048
    wide both ways (GPU tiles), else 16; 0 turns adapters off."""
    if fraction <= 0:
        return 0
    m = min(in_features, out_features)
    tile = 128 if m >= 2048 else 16
    return min(m, tile * math.ceil(fraction * m / tile))


def adapter_nbytes(in_features: int, out_features: int, cfg: CompressConfig) -> int:
    """Stored bytes of one layer's adapters under `cfg` (0 without): what the size targets count."""
    r = adapter_rank(cfg.lowrank, in_features, out_features)
    if r == 0:
        return 0
    if cfg.lowrank_bits == 16:
        return 2 * r * (in_features + out_features)
    g = cfg.lowrank_group
    return (packing.packed_nbytes(r * in_features, cfg.lowrank_bits) + 2 * r * num_groups(in_features, g)
            + packing.packed_nbytes(out_features * r, cfg.lowrank_bits) + 2 * out_features * num_groups(r, g))


AUTO_FRACTIONS = (0.05, 0.1, 0.2)  # the ranks --lowrank auto offers CVXQ's allocation (and 0)


def rank_options(W: torch.Tensor, sens: torch.Tensor, cfg: CompressConfig, width: int) -> list[tuple[int, float, float]]:
    """(rank, adapter bits, distortion saved) of each AUTO_FRACTIONS rank for one linear W [out, in]: the
    saliency-weighted rank-r repair of its plain-rounding error at `width` bits (groups of 64), the distortion
    in CVXQ's units (sum of the sensitivities `sens` [out, in] or [in] times the squared error)."""
    from .methods.rtn import rtn_quantize

    out_f, in_f = W.shape
    W = W.to(torch.float32)
    sens = sens.to(W.device, torch.float32)
    E = W - rtn_quantize(W, CompressConfig(method="rtn", bits=width, group_size=64, clip_search=cfg.clip_search,
                                           max_shrink=cfg.max_shrink)).dequantize()
    s_col = (sens.mean(0) if sens.dim() == 2 else sens).clamp_min(0)
    d0 = float((E.square() * sens).sum(dtype=torch.float64))
    out = []
    for f in AUTO_FRACTIONS:
        r = adapter_rank(f, in_f, out_f)
        D, U = saliency_lowrank(E, s_col, r)
        saved = d0 - float(((E - U @ D).square() * sens).sum(dtype=torch.float64))
        out.append((r, 8.0 * adapter_nbytes(in_f, out_f, cfg.replace(lowrank=f)), saved))
    return out


def saliency(h_diag: torch.Tensor) -> torch.Tensor:
    """sqrt(s) per input channel from diag H; channels that never fire take the smallest positive value
    (SLiM's shift), so the weighting stays invertible."""
    s = h_diag.to(torch.float32).clamp_min(0)
    pos = s[s > 0]
    floor = float(pos.min()) if pos.numel() else 1.0
    return torch.sqrt(torch.where(s > 0, s, torch.full_like(s, floor)))


def saliency_lowrank(E: torch.Tensor, h_diag: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(D [rank, in], U [out, rank]) in float32 with U D the best rank-r approximation of E [out, in] in
    the sqrt(s)-weighted Frobenius norm (s from diag H)."""
    sq = saliency(h_diag).to(E.device)
    U, S, Vh = torch.linalg.svd(E.to(torch.float32) * sq, full_matrices=False)
    r = min(rank, S.numel())
    return (S[:r, None] * Vh[:r] / sq).contiguous(), U[:, :r].contiguous()


def fit_adapters(W: torch.Tensor, Q: torch.Tensor, h_diag: torch.Tensor, cfg: CompressConfig,
                 rank: int | None = None) -> LowRank | None:
    """The adapters of one layer (W original, Q its quantized weight, both [out, in]) as stored: fp16, or
    symmetric codes on groups of lowrank_group with the clip search (D's error weighted by s, as the
    output sees it). `rank`: the allocation's (--lowrank auto), else from the --lowrank fraction. None when
    the rank is 0."""
    from .methods.rtn import rtn_quantize

    out_f, in_f = W.shape
    r = adapter_rank(cfg.lowrank, in_f, out_f) if rank is None else rank
    if r == 0:
        return None
    D, U = saliency_lowrank(W.to(torch.float32) - Q.to(torch.float32), h_diag, r)
    if cfg.lowrank_bits == 16:
        return LowRank(D.to(torch.float16), U.to(torch.float16), 16, cfg.lowrank_group)
    qcfg = cfg.replace(bits=cfg.lowrank_bits, symmetric=True, group_size=cfg.lowrank_group)
    s = h_diag.to(torch.float32).clamp_min(0)
    return LowRank(rtn_quantize(D, qcfg, col_weight=s), rtn_quantize(U, qcfg), cfg.lowrank_bits, cfg.lowrank_group)


class AdapterTuning:
    """Distillation tuning (tune.py) of a layer with adapters: only the adapters move, the base stays as
    solved. fp16 factors move freely; quantized ones move their group scales (codes fixed). The
    layer's weight is W_q + U D (layouts.base.Tuning's interface)."""

    def __init__(self, base_weight: torch.Tensor, lowrank: LowRank) -> None:
        from .layouts.affine import AffineTuning

        self.Wq, self.lowrank = base_weight.to(torch.float32), lowrank
        if lowrank.bits == 16:
            self.factors = None
            self.base = {"lowrank_down": lowrank.down.to(torch.float32), "lowrank_up": lowrank.up.to(torch.float32)}
        else:
            self.factors = {"lowrank_down": AffineTuning(lowrank.down), "lowrank_up": AffineTuning(lowrank.up)}
            self.base = {f"{k}_scales": t.base["scales"] for k, t in self.factors.items()}

    def _matrices(self, values: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.factors is None:
            return values["lowrank_down"], values["lowrank_up"]
        return tuple(t.weight({"scales": values[f"{k}_scales"]}) for k, t in self.factors.items())  # type: ignore[return-value]

    def weight(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        D, U = self._matrices(values)
        return self.Wq + U @ D

    def stored(self, values: dict[str, torch.Tensor], scale_bits: int) -> dict[str, torch.Tensor]:
        if self.factors is None:
            return {k: v.to(torch.float16) for k, v in values.items()}
        out = {}
        for k, t in self.factors.items():
            out[f"{k}_scales"] = t.stored({"scales": values[f"{k}_scales"]}, scale_bits)["scales"]
        return out
