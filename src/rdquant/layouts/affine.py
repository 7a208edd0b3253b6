"""Affine groups (GPTQ, RTN): packed codes, one fp16 scale and (asymmetric) one packed zero point per
group of `group_size` weights along a row (qtensor.QuantizedWeight; docs/FORMAT.md)."""

from __future__ import annotations

import torch

from .. import packing
from ..qtensor import QuantizedWeight, expand_groups, num_groups
from .base import LayerSpec, Layout, Tuning


class Affine(Layout):
    name = "affine"
    stored = ("qweight", "scales", "qzeros")

    @classmethod
    def buffers(cls, layer: LayerSpec) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        out_f, in_f = layer.shape
        n_g = num_groups(in_f, layer.group_size)
        out = {"qweight": (torch.uint8, (packing.packed_nbytes(out_f * in_f, layer.bits),)),
               "scales": (torch.float16, (out_f, n_g))}
        if not layer.symmetric:
            out["qzeros"] = (torch.uint8, (packing.packed_nbytes(out_f * n_g, layer.bits),))
        return out

    @classmethod
    def weight(cls, state: dict[str, torch.Tensor], layer: LayerSpec) -> QuantizedWeight:
        return QuantizedWeight.from_packed(state, layer.shape, layer.bits, layer.group_size)

    @classmethod
    def describe(cls, layer: LayerSpec) -> str:
        return f"bits={layer.bits}, group_size={layer.group_size}, symmetric={layer.symmetric}"

    @classmethod
    def tuning(cls, weight: QuantizedWeight) -> "AffineTuning":
        return AffineTuning(weight)


class AffineTuning(Tuning):
    """The group scales move; codes and zero points stay."""

    def __init__(self, qw: QuantizedWeight) -> None:
        self.qw = qw
        in_f = qw.shape[1]
        self.q = qw.codes.to(torch.float32) - expand_groups(qw.zero_points().to(torch.float32), in_f, qw.group_size)
        self.base = {"scales": qw.scales.to(torch.float32)}

    def weight(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.q * expand_groups(values["scales"], self.qw.shape[1], self.qw.group_size)

    def stored(self, values: dict[str, torch.Tensor], scale_bits: int) -> dict[str, torch.Tensor]:
        from ..grid import store_scale

        return {"scales": store_scale(values["scales"], scale_bits).to(torch.float16)}
