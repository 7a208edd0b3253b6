"""Affine groups (GPTQ, RTN): packed codes, one fp16 scale and (asymmetric) one packed zero point per
group of `group_size` weights along a row (qtensor.QuantizedWeight; docs/FORMAT.md)."""

from __future__ import annotations

import torch

from .. import packing
from ..qtensor import QuantizedWeight, expand_groups, grid_buffers
from .base import LayerSpec, Layout, Tuning


class Affine(Layout):
    name = "affine"
    stored = ("qweight", "scales", "qzeros")

    @classmethod
    def buffers(cls, layer: LayerSpec) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        out_f, in_f = layer.shape
        return {"qweight": (torch.uint8, (packing.packed_nbytes(out_f * in_f, layer.bits),)),
                **grid_buffers(out_f, in_f, layer.bits, layer.group_size, layer.symmetric)}

    @classmethod
    def weight(cls, state: dict[str, torch.Tensor], layer: LayerSpec) -> QuantizedWeight:
        return QuantizedWeight.from_packed(state, layer.shape, layer.bits, layer.group_size)

    @classmethod
    def describe(cls, layer: LayerSpec) -> str:
        return f"bits={layer.bits}, group_size={layer.group_size}, symmetric={layer.symmetric}"

    @classmethod
    def gather_rows(cls, state: dict[str, torch.Tensor], layer: LayerSpec, rows: torch.Tensor) -> torch.Tensor | None:
        """Rows `rows` of the weight, dequantized (float32 [n, in]), unpacking only those rows' codes:
        an embedding lookup. None when rows do not start on byte boundaries (in_features % 8)."""
        from ..qtensor import dequantize_grouped

        out_f, in_f = layer.shape
        if in_f % 8:
            return None
        per_row = in_f // 8 * layer.bits
        packed = state["qweight"][: out_f * per_row].view(out_f, per_row)[rows]
        codes = packing.unpack(packed.reshape(-1), layer.bits, rows.numel() * in_f).view(-1, in_f)
        scales = state["scales"][rows]
        n_g = scales.shape[1]
        if "qzeros" in state:
            zeros = packing.unpack(state["qzeros"], layer.bits, out_f * n_g).view(out_f, n_g)[rows]
        else:
            zeros = torch.full_like(scales, float(1 << (layer.bits - 1)), dtype=torch.float32)
        return dequantize_grouped(codes, scales, zeros, layer.group_size)

    stream_mappings = ("zero-context", "zero-context-packed", "zero-context-pairs")
    # kernels/matmul_triton.py: widths 1..8, any group size (GPU); kernels/int4_cpu.py: torch's CPU int4
    # kernel, 4 bits, groups of 32..256 that divide the row
    kernels = ("triton", "int4-cpu")

    @classmethod
    def kernel_supports(cls, layer: LayerSpec, backend: str) -> bool:
        if backend == "int4-cpu":
            from ..kernels import int4_cpu

            return int4_cpu.supports(layer.bits, layer.group_size, layer.in_features, layer.out_features)
        return backend == "triton" and 1 <= layer.bits <= 8

    @classmethod
    def prepare_kernel(cls, weight: QuantizedWeight, backend: str):
        if backend == "int4-cpu":
            from ..kernels import int4_cpu

            return int4_cpu.repack(weight.codes, weight.scales, weight.zeros, weight.group_size)
        from ..kernels.matmul_triton import repack_affine

        return repack_affine(weight.codes, weight.scales, weight.zeros, weight.bits, weight.group_size)

    @classmethod
    def kernel_linear(cls, x: torch.Tensor, prepared, backend: str) -> torch.Tensor:
        if backend == "int4-cpu":
            from ..kernels import int4_cpu

            return int4_cpu.matmul(x, prepared)
        from ..kernels.matmul_triton import affine_matmul

        return affine_matmul(x, prepared)

    @classmethod
    def encode_qweight(cls, t, tensors, owner, layer, codec, speed_floor_mbps):
        """raw or zero-relative symbols (lower entropy), or the codes split by their group's zero point
        (`zero-context`, cut from the packed bytes where groups are whole bytes): the smallest payload."""
        from .. import codecs
        from ..coding import (LayerInfo, _packed_form, _zero_point_rows, best_mapping, choose_codec, context_entropy_bits,
                              encode_context, encode_streams, packed_context_ok, weight_symbols)

        info = LayerInfo.from_manifest(layer)
        qzeros = tensors.get(f"{owner}.qzeros")
        mapping, sym, h = best_mapping(t, qzeros, info)
        spec, payload = choose_codec(sym, codec, speed_floor_mbps)
        if qzeros is not None:  # the zero point as context: kept when its payload is smaller
            codes = weight_symbols(t, qzeros, info, "raw")
            candidates = []
            ans_possible = codec == "ans" or (codec == "auto" and codecs.NOMINAL_DECODE_MBPS["ans"] >= speed_floor_mbps)
            # the packed form decodes without re-packing: the one-code-per-byte streams are tried
            # only where it is impossible, or for ANS (a symbol coder, not a byte coder)
            packed_ok = packed_context_ok(info)
            if ans_possible or (not packed_ok and codec != "lz4"):
                candidates.append(("zero-context", encode_context(codes, info, qzeros, codec, speed_floor_mbps)))
            if packed_ok:  # the zero points' groups cut once, coded as planes and (3 bits) as pairs
                rows = _zero_point_rows(t, info, qzeros)
                forms = [("zero-context-packed", False)]
                forms += [("zero-context-pairs", True)] if info.bits == 3 and codec != "lz4" else []
                candidates += [(name_c, encode_streams(_packed_form(rows, info.bits, pr), codec, speed_floor_mbps))
                               for name_c, pr in forms]
            for name_c, ctx in candidates:
                if len(ctx) < len(payload):
                    mapping, payload = name_c, ctx
            if mapping.startswith("zero-context"):
                h = context_entropy_bits(codes, info, qzeros)
        return spec, payload, {"kind": "symbols", "mapping": mapping, "entropy_bits": round(h, 4)}

    @classmethod
    def decode_streams(cls, mapping, payload, decoded, owner, layer, needs):
        from .. import codecs
        from ..coding import LayerInfo, decode_context, merge_packed_context_streams, packed_context_ok

        info = LayerInfo.from_manifest(layer)
        qzeros = needs("qzeros", "zero points")
        if mapping != "zero-context":
            if not packed_context_ok(info):
                raise codecs.CodecError(f"mapping {mapping} needs whole-byte groups")
            return merge_packed_context_streams(*codecs.read_streams(payload.numpy(), reuse=True), info, qzeros,
                                                pairs=mapping == "zero-context-pairs")
        codes = decode_context(payload.numpy(), info, qzeros)
        if codes.size and int(codes.max()) >= (1 << info.bits):
            raise codecs.CodecError("decoded codes fall outside the code range")
        return packing.pack(torch.from_numpy(codes), info.bits)

    @classmethod
    def decode_symbols(cls, mapping, sym, decoded, owner, layer):
        from .. import codecs
        from ..coding import LayerInfo, weight_from_symbols

        if mapping not in ("raw", "zero-relative"):
            raise codecs.CodecError(f"mapping {mapping} does not belong to an affine layer")
        return weight_from_symbols(sym, decoded.get(f"{owner}.qzeros"), LayerInfo.from_manifest(layer), mapping)

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
