"""Layer-input statistics: H = 2 X^T X / n accumulated in float32 over calibration tokens."""

from __future__ import annotations

import math

import torch

from .errors import RdquantError


class HessianAccumulator:
    """Running mean of 2 x x^T over the rows x of every input batch (GPTQ's add_batch)."""

    def __init__(self, n_features: int, device: torch.device | str = "cpu") -> None:
        self.H = torch.zeros(n_features, n_features, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor, name: str = "layer") -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        if not torch.isfinite(x).all():
            raise RdquantError(
                f"non-finite (NaN/Inf) activations reach {name}: the model overflows on the "
                "calibration data in this dtype; load it in float32 or check the checkpoint"
            )
        m = x.shape[0]
        self.H.mul_(self.n / (self.n + m))
        self.n += m
        x = x * math.sqrt(2.0 / self.n)
        self.H.addmm_(x.t(), x)
