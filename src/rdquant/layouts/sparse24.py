"""Sparse layouts (SLiM). 2:4: two kept codes of every four inputs, bit-packed at their width, 2-bit
positions per kept value (qsparse.Sparse24Weight). Unstructured 50%: half of every row kept anywhere,
a 1-bit mask per weight (qsparse.SparseHalfWeight). Both: per-group affine grids along the dense input
(docs/FORMAT.md). Runtime: the reference path dequantizes and scatters; on CUDA a Triton kernel reads
2:4's packed form (kernels/sparse24_triton.py). Distillation tuning moves the group scales."""

from __future__ import annotations

import torch

from .. import packing
from ..qsparse import Sparse24Weight, SparseHalfWeight, check_shape
from ..qtensor import grid_buffers
from .base import LayerSpec, Layout, Tuning


class Sparse24(Layout):
    name = "sparse24"
    stored = ("qweight", "meta", "scales", "qzeros")

    pattern, label, weight_cls = "2:4", "2:4 sparse", Sparse24Weight

    @classmethod
    def positions(cls, out_f: int, in_f: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """The stored tensor that says where the kept values sit: one nibble per run of four."""
        return {"meta": (torch.uint8, (packing.packed_nbytes(out_f * in_f // 4, 4),))}

    @classmethod
    def buffers(cls, layer: LayerSpec) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        out_f, in_f = layer.shape
        check_shape(in_f, cls.pattern)
        return {"qweight": (torch.uint8, (packing.packed_nbytes(out_f * in_f // 2, layer.bits),)),
                **cls.positions(out_f, in_f), **grid_buffers(out_f, in_f, layer.bits, layer.group_size, layer.symmetric)}

    @classmethod
    def weight(cls, state: dict[str, torch.Tensor], layer: LayerSpec) -> Sparse24Weight | SparseHalfWeight:
        return cls.weight_cls.from_packed(state, layer.shape, layer.bits, layer.group_size)

    @classmethod
    def describe(cls, layer: LayerSpec) -> str:
        return f"{cls.label}, bits={layer.bits}, group_size={layer.group_size}, symmetric={layer.symmetric}"

    kernels = ("triton",)  # kernels/sparse24_triton.py: widths 1..8, any group size (GPU)

    @classmethod
    def kernel_supports(cls, layer: LayerSpec, backend: str) -> bool:
        return backend == "triton" and 1 <= layer.bits <= 8

    @classmethod
    def prepare_kernel(cls, weight: Sparse24Weight, backend: str):
        from ..kernels.sparse24_triton import repack_sparse24

        return repack_sparse24(weight.codes, weight.idx, weight.scales, weight.zeros, weight.bits, weight.group_size)

    @classmethod
    def kernel_linear(cls, x: torch.Tensor, prepared, backend: str) -> torch.Tensor:
        from ..kernels.sparse24_triton import sparse24_matmul

        return sparse24_matmul(x, prepared)

    @classmethod
    def encode_qweight(cls, t, tensors, owner, layer, codec, speed_floor_mbps):
        """The kept codes as one symbol per code (their positions are a separate byte tensor)."""
        from ..coding import symbol_payload

        out_f, in_f = layer["shape"]
        return symbol_payload(packing.unpack(t, layer["bits"], out_f * in_f // 2).numpy(), "raw", codec, speed_floor_mbps)

    @classmethod
    def decode_symbols(cls, mapping, sym, decoded, owner, layer):
        from .. import codecs

        if mapping != "raw":
            raise codecs.CodecError(f"mapping {mapping} does not belong to a 2:4 sparse layer")
        out_f, in_f = layer["shape"]
        if sym.size != out_f * in_f // 2:
            raise codecs.CodecError("decoded symbol count does not match the layer's kept values")
        if sym.size and int(sym.max()) >= (1 << layer["bits"]):
            raise codecs.CodecError("decoded codes fall outside the code range")
        return packing.pack(torch.from_numpy(sym.copy() if not sym.flags.writeable else sym), layer["bits"])

    @classmethod
    def tuning(cls, weight: Sparse24Weight) -> "Sparse24Tuning":
        return Sparse24Tuning(weight)


class SparseHalf(Sparse24):
    """Unstructured 50%: the kept codes as 2:4's, their places a bitmask (1 bit per weight, row-major).
    No GPU kernel: the reference and cached backends run it."""

    name = "sparse50"
    stored = ("qweight", "bitmask", "scales", "qzeros")
    pattern, label, weight_cls = "unstructured", "50% sparse (unstructured)", SparseHalfWeight
    kernels = ()

    @classmethod
    def positions(cls, out_f: int, in_f: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {"bitmask": (torch.uint8, (packing.packed_nbytes(out_f * in_f, 1),))}

    @classmethod
    def kernel_supports(cls, layer: LayerSpec, backend: str) -> bool:
        return False


class Sparse24Tuning(Tuning):
    """The group scales move; the kept codes, their positions and the zero points stay."""

    def __init__(self, w: Sparse24Weight | SparseHalfWeight) -> None:
        from dataclasses import replace

        self.w = w
        unit = replace(w, scales=torch.ones_like(w.scales, dtype=torch.float32))
        self.q = unit.dequantize(torch.float32)  # (code - zero) at the kept positions, 0 elsewhere
        self.base = {"scales": w.scales.to(torch.float32)}

    def weight(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        from ..qtensor import expand_groups

        return self.q * expand_groups(values["scales"], self.w.shape[1], self.w.group_size)

    def stored(self, values: dict[str, torch.Tensor], scale_bits: int) -> dict[str, torch.Tensor]:
        from ..grid import store_scale

        return {"scales": store_scale(values["scales"], scale_bits).to(torch.float16)}
