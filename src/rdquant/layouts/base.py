"""The Layout interface: what every packed weight format provides to the runtime and the pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch


@dataclass(frozen=True)
class LayerSpec:
    """What a layer's manifest entry says about its packed weight: shape [out, in], the (widest) code
    width, group size (codebook: columns per codebook), symmetry, and the layout's own fields."""

    out_features: int
    in_features: int
    bits: int
    group_size: int
    symmetric: bool
    spec: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)


class Layout:
    """One packed weight format. Subclasses set `name` (the manifest's `layout`), `stored` (every tensor
    name it may write, in the artifact's order) and `resizable` (buffer sizes come from the data)."""

    name: ClassVar[str]
    stored: ClassVar[tuple[str, ...]]
    resizable: ClassVar[bool] = False

    @classmethod
    def buffers(cls, layer: LayerSpec) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """The stored tensors this layer has: name -> (dtype, shape to allocate; (0,) when sized by data)."""
        raise NotImplementedError

    @classmethod
    def weight(cls, state: dict[str, torch.Tensor], layer: LayerSpec):
        """The weight object (with dequantize, packed_state, round_to_grid) of the stored tensors."""
        raise NotImplementedError

    @classmethod
    def describe(cls, layer: LayerSpec) -> str:
        """The layout part of the layer's repr."""
        raise NotImplementedError

    # --- entropy coding of the codes (coding.py's container calls these; docs/FORMAT.md lists the mappings)
    stream_mappings: ClassVar[tuple[str, ...]] = ()  # multi-stream forms this layout's tensors may be stored in

    @classmethod
    def encode_qweight(cls, qweight: torch.Tensor, tensors: dict[str, torch.Tensor], owner: str, layer: dict[str, Any],
                       codec: str, speed_floor_mbps: float) -> tuple[Any, bytes, dict[str, Any]]:
        """(codec spec, payload, manifest fields) of the smallest symbol mapping of the packed codes."""
        raise NotImplementedError

    @classmethod
    def side_streams(cls, leaf: str, t: torch.Tensor, data: Any, tensors: dict[str, torch.Tensor],
                     owner: str) -> tuple[str, list] | None:
        """(mapping, streams) of a multi-stream form of one of the layer's other tensors, if the layout has one."""
        return None

    @classmethod
    def decode_streams(cls, mapping: str, payload: torch.Tensor, decoded: dict[str, torch.Tensor], owner: str,
                       layer: dict[str, Any], needs) -> torch.Tensor:
        """A tensor stored in one of `stream_mappings` (`needs(leaf, what)` gives a decoded tensor of the layer)."""
        raise NotImplementedError

    @classmethod
    def decode_symbols(cls, mapping: str, sym: Any, decoded: dict[str, torch.Tensor], owner: str,
                       layer: dict[str, Any]) -> torch.Tensor:
        """The packed codes from one decoded symbol stream of `mapping`."""
        raise NotImplementedError

    # --- kernels (runtime backends beyond `reference` and `cached`) ---------------------------------
    kernels: ClassVar[tuple[str, ...]] = ()  # e.g. ("triton",)

    @classmethod
    def kernel_supports(cls, layer: LayerSpec, backend: str) -> bool:
        """Whether `backend`'s kernel takes this layer (widths, group sizes it was written for)."""
        return backend in cls.kernels

    @classmethod
    def prepare_kernel(cls, weight, backend: str) -> Any:
        """The layer repacked for `backend`'s kernel (at load, in memory; never on disk)."""
        raise NotImplementedError

    @classmethod
    def kernel_linear(cls, x: torch.Tensor, prepared: Any, backend: str) -> torch.Tensor:
        """x @ W^T by `backend`'s kernel, reading the prepared packed form only (no bias)."""
        raise NotImplementedError

    @classmethod
    def tuning(cls, weight) -> "Tuning | None":
        """The values distillation tuning may move with the codes fixed; None if the layout has none."""
        return None


class Tuning:
    """A layer's free values as trainable tensors: `base` (name -> float32 tensor), `weight(values)`
    rebuilds W from them, `stored(values, scale_bits)` gives the stored tensors that hold them."""

    base: dict[str, torch.Tensor]

    def weight(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def stored(self, values: dict[str, torch.Tensor], scale_bits: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError
