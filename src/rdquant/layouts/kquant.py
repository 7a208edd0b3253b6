"""llama.cpp k-quants (Q2_K .. Q6_K): the layer's GGUF blocks as stored, the bytes a GGUF file holds
(kquant.KQuantWeight; docs/FORMAT.md). Written by GPTQ / RTN with `--grid gguf:TYPE`; the runtime
dequantizes (reference, cached), there is no kernel; the GGUF export copies the blocks."""

from __future__ import annotations

import torch

from ..kquant import KQuantWeight, ktype
from .base import LayerSpec, Layout


class KQuant(Layout):
    name = "kquant"
    stored = ("qweight",)

    @classmethod
    def buffers(cls, layer: LayerSpec) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        out_f, in_f = layer.shape
        kt = ktype(layer.spec["gguf_type"])
        if in_f % 256:
            raise ValueError(f"a {kt.name} layer needs rows of whole 256-weight super-blocks, got {in_f} columns")
        return {"qweight": (torch.uint8, (out_f * in_f // 256 * kt.block_bytes,))}

    @classmethod
    def weight(cls, state: dict[str, torch.Tensor], layer: LayerSpec) -> KQuantWeight:
        return KQuantWeight.from_packed(state, layer.shape, layer.spec["gguf_type"])

    @classmethod
    def describe(cls, layer: LayerSpec) -> str:
        return f"gguf {layer.spec['gguf_type']} (k-quant), bits={layer.bits}"

    @classmethod
    def encode_qweight(cls, t, tensors, owner, layer, codec, speed_floor_mbps):
        """The GGUF block bytes as one symbol each (codes, scales and factors together)."""
        from ..coding import symbol_payload

        return symbol_payload(t.reshape(-1).numpy(), "bytes", codec, speed_floor_mbps)

    @classmethod
    def decode_symbols(cls, mapping, sym, decoded, owner, layer):
        from .. import codecs

        if mapping != "bytes":
            raise codecs.CodecError(f"mapping {mapping} does not belong to a k-quant layer")
        out_f, in_f = layer["shape"]
        if sym.size != out_f * in_f // 256 * ktype(layer["gguf_type"]).block_bytes:
            raise codecs.CodecError("decoded byte count does not match the layer's k-quant blocks")
        return torch.from_numpy(sym.astype("uint8"))
