"""Mixed widths (CVXQ cells): a width, an fp16 scale and a zero point per row-group or row-cluster
cell, codes packed one segment per width (qmixed.MixedWeight; docs/FORMAT.md)."""

from __future__ import annotations

import torch

from ..qmixed import MixedWeight
from .base import LayerSpec, Layout

EMPTY = (0,)


class Mixed(Layout):
    name = "mixed"
    stored = ("qweight", "qwidths", "scales", "qzeros", "qclusters")
    resizable = True

    @classmethod
    def buffers(cls, layer: LayerSpec) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        out = {"qweight": (torch.uint8, EMPTY), "qwidths": (torch.uint8, EMPTY), "scales": (torch.float16, EMPTY)}
        if layer.spec.get("grid", "affine") == "affine":  # the companded grid stores no zero points
            out["qzeros"] = (torch.uint8, EMPTY)
        if layer.spec.get("clusters"):  # row-cluster x column cells
            out["qclusters"] = (torch.int16, EMPTY)
        return out

    @classmethod
    def weight(cls, state: dict[str, torch.Tensor], layer: LayerSpec) -> MixedWeight:
        return MixedWeight.from_packed(state, layer.shape, layer.group_size, layer.spec["width_bits"],
                                       layer.spec.get("grid", "affine"))

    @classmethod
    def describe(cls, layer: LayerSpec) -> str:
        return f"layout=mixed, max_bits={layer.bits}, group_size={layer.group_size}"
