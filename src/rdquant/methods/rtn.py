"""Round-to-nearest: each group of each row snapped to its own grid, no calibration needed."""

from __future__ import annotations

import torch

from .. import kquant
from ..config import CompressConfig
from ..grid import group_grid, quantize
from ..qtensor import QuantizedWeight, expand_groups


def rtn_quantize(
    W: torch.Tensor, cfg: CompressConfig, col_weight: torch.Tensor | None = None
) -> "QuantizedWeight | kquant.KQuantWeight":
    """Quantize W [out, in] group by group (ragged last group allowed); with `--grid gguf:TYPE`, on the
    k-quant grid (rows of whole super-blocks) or its block-32 fallback."""
    if cfg.grid != "affine":
        if W.shape[1] % kquant.QK == 0:
            return kquant.quantize_rtn(W, kquant.grid_type(cfg.grid), col_weight, cfg.clip_search, cfg.max_shrink)
        cfg = kquant.fallback_config(cfg)
    W = W.to(torch.float32)
    scales, zeros = group_grid(
        W, cfg.bits, cfg.symmetric, cfg.group_size, cfg.clip_search, cfg.max_shrink, col_weight, cfg.scale_bits
    )
    in_f = W.shape[1]
    S = expand_groups(scales, in_f, cfg.group_size)
    Z = expand_groups(zeros, in_f, cfg.group_size)
    codes = quantize(W, S, Z, cfg.bits).to(torch.uint8)
    zero_t = None if cfg.symmetric else zeros.to(torch.uint8)
    return QuantizedWeight(codes, scales.to(torch.float16), zero_t, cfg.bits, cfg.group_size)
