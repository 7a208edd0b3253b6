"""Low-rank adapters stored beside a quantized weight, any layout (SLiM's saliency adapters, lowrank.py):
the layer computes x W_q^T + (x D^T) U^T with D [rank, in] and U [out, rank].

A layer's manifest entry says `lowrank: {rank, bits, group_size}`. With bits 16 the factors are fp16
tensors `lowrank_down` and `lowrank_up`; with 2..8 bits they are symmetric affine codes, bit-packed as
the affine layout packs them (groups of `group_size` along each factor's own input: D's along the layer's
input, U's along the rank), with fp16 scales `lowrank_down_scales` / `lowrank_up_scales`. This module
never imports the algorithms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from . import packing
from .qtensor import QuantizedWeight, num_groups

STORED = ("lowrank_down", "lowrank_down_scales", "lowrank_up", "lowrank_up_scales")


def check_spec(spec: Any) -> bool:
    """Whether a manifest's `lowrank` field is well formed."""
    return (isinstance(spec, dict) and all(isinstance(spec.get(k), int) and not isinstance(spec.get(k), bool)
                                           for k in ("rank", "bits", "group_size"))
            and spec["rank"] >= 1 and spec["bits"] in (2, 3, 4, 5, 6, 7, 8, 16)
            and (spec["group_size"] == -1 or spec["group_size"] >= 1))


def buffers(spec: dict, in_features: int, out_features: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """The stored tensors of a layer's adapters: name -> (dtype, shape)."""
    r, bits, g = spec["rank"], spec["bits"], spec["group_size"]
    if bits == 16:
        return {"lowrank_down": (torch.float16, (r, in_features)), "lowrank_up": (torch.float16, (out_features, r))}
    return {"lowrank_down": (torch.uint8, (packing.packed_nbytes(r * in_features, bits),)),
            "lowrank_down_scales": (torch.float16, (r, num_groups(in_features, g))),
            "lowrank_up": (torch.uint8, (packing.packed_nbytes(out_features * r, bits),)),
            "lowrank_up_scales": (torch.float16, (out_features, num_groups(r, g)))}


@dataclass
class LowRank:
    """A layer's adapter factors: down D [rank, in] and up U [out, rank], each fp16 or quantized."""

    down: "torch.Tensor | QuantizedWeight"
    up: "torch.Tensor | QuantizedWeight"
    bits: int = 16
    group_size: int = -1

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def spec(self) -> dict[str, int]:
        return {"rank": self.rank, "bits": self.bits, "group_size": self.group_size}

    def matrices(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(D, U) dequantized."""
        f = lambda t: t.to(dtype) if isinstance(t, torch.Tensor) else t.dequantize(dtype)
        return f(self.down), f(self.up)

    def delta(self) -> torch.Tensor:
        """U D [out, in] in float32: what the adapters add to the weight."""
        D, U = self.matrices()
        return U @ D

    def packed_state(self) -> dict[str, torch.Tensor]:
        if self.bits == 16:
            return {"lowrank_down": self.down.to(torch.float16).contiguous(), "lowrank_up": self.up.to(torch.float16).contiguous()}
        state = {}
        for name, q in (("lowrank_down", self.down), ("lowrank_up", self.up)):
            packed = q.packed_state()
            state[name], state[name + "_scales"] = packed["qweight"], packed["scales"]
        return state

    @classmethod
    def from_packed(cls, state: dict[str, torch.Tensor], spec: dict, in_features: int, out_features: int) -> "LowRank":
        r, bits, g = spec["rank"], spec["bits"], spec["group_size"]
        if bits == 16:
            return cls(state["lowrank_down"], state["lowrank_up"], 16, g)
        down, up = ((QuantizedWeight.from_packed({"qweight": state[n], "scales": state[n + "_scales"]}, shape, bits, g))
                    for n, shape in (("lowrank_down", (r, in_features)), ("lowrank_up", (out_features, r))))
        return cls(down, up, bits, g)
