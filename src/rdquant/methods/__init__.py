"""Per-matrix quantization methods, one module each, behind one signature:
`quantize(W [out, in], H [in, in] | None, cfg) -> (QuantizedWeight, notes)`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..config import CompressConfig
from ..qtensor import QuantizedWeight
from .gptq import gptq_quantize
from .rtn import rtn_quantize

QuantizeFn = Callable[[torch.Tensor, "torch.Tensor | None", CompressConfig], "tuple[QuantizedWeight, list[str]]"]


@dataclass(frozen=True)
class Method:
    name: str
    quantize: QuantizeFn
    needs_hessian: bool


def _rtn(W: torch.Tensor, H: torch.Tensor | None, cfg: CompressConfig) -> tuple[QuantizedWeight, list[str]]:
    return rtn_quantize(W, cfg), []


def _gptq(W: torch.Tensor, H: torch.Tensor | None, cfg: CompressConfig) -> tuple[QuantizedWeight, list[str]]:
    assert H is not None, "GPTQ needs the layer Hessian"
    return gptq_quantize(W, H, cfg)


METHODS: dict[str, Method] = {
    "rtn": Method("rtn", _rtn, needs_hessian=False),
    "gptq": Method("gptq", _gptq, needs_hessian=True),
}
