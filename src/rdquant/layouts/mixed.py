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

    stream_mappings = ("mixed-widths",)
    kernels = ("triton",)  # kernels/matmul_triton.segment_matmul: row-cluster x column cells, affine grid

    @classmethod
    def kernel_supports(cls, layer: LayerSpec, backend: str) -> bool:
        """Row-cluster cells on the affine grid (CVXQ's default); row-group cells and the companded
        grid have no kernel yet (they run `cached`)."""
        return backend == "triton" and bool(layer.spec.get("clusters")) and layer.spec.get("grid", "affine") == "affine"

    @classmethod
    def prepare_kernel(cls, weight: MixedWeight, backend: str):
        from ..kernels.matmul_triton import repack_segments

        return repack_segments(weight.codes, weight.clusters, weight.widths, weight.scales, weight.zeros)

    @classmethod
    def kernel_linear(cls, x: torch.Tensor, prepared, backend: str) -> torch.Tensor:
        from ..kernels.matmul_triton import segment_matmul

        return segment_matmul(x, prepared)

    @classmethod
    def encode_qweight(cls, t, tensors, owner, layer, codec, speed_floor_mbps):
        """One symbol stream over every width, or one stream (table) per cell width, 3 bits as pairs
        (`mixed-widths`): the smaller."""
        from ..coding import (_mixed_segments, _mixed_width_map, _width_entropy_bits, encode_streams, segment_streams,
                              symbol_payload)
        from ..qmixed import unpack_by_width

        wmap = _mixed_width_map(tensors, owner, layer)
        sym = unpack_by_width(t, wmap).reshape(-1).numpy()
        spec, payload, fields = symbol_payload(sym, "mixed", codec, speed_floor_mbps)
        if codec != "lz4":
            per_width = encode_streams(segment_streams(t, _mixed_segments(tensors, owner, layer), pairs=True),
                                       codec, speed_floor_mbps)
            if len(per_width) < len(payload):
                payload = per_width
                fields = {"kind": "symbols", "mapping": "mixed-widths",
                          "entropy_bits": round(_width_entropy_bits(sym, wmap.numpy()), 4)}
        return spec, payload, fields

    @classmethod
    def decode_streams(cls, mapping, payload, decoded, owner, layer, needs):
        from .. import codecs
        from ..coding import _mixed_segments, merge_segment_streams

        return merge_segment_streams(*codecs.read_streams(payload.numpy(), reuse=True),
                                     _mixed_segments(decoded, owner, layer), pairs=True)

    @classmethod
    def decode_symbols(cls, mapping, sym, decoded, owner, layer):
        import numpy as np

        from .. import codecs
        from ..coding import _mixed_width_map
        from ..qmixed import pack_by_width

        if mapping != "mixed":
            raise codecs.CodecError(f"mapping {mapping} does not belong to a mixed-width layer")
        wmap = _mixed_width_map(decoded, owner, layer)
        if sym.size != wmap.numel():
            raise codecs.CodecError("decoded symbol count does not match the layer shape")
        codes = torch.from_numpy(np.ascontiguousarray(sym).reshape(wmap.shape).copy())
        if bool((codes.to(torch.long) >= (1 << wmap.to(torch.long))).any()):
            raise codecs.CodecError("decoded codes fall outside their cell widths")
        return pack_by_width(codes, wmap)
