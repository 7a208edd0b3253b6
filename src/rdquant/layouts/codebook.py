"""Column codebooks (CLAQ): codes packed per column width, fp16 (or 8-bit on an fp16 grid) codebooks
per column group, optional fp16 row scales and sparse fp16 outliers (qcodebook.CodebookWeight;
docs/FORMAT.md)."""

from __future__ import annotations

import torch

from ..qcodebook import CodebookWeight, column_offsets, compact_codebooks, entries_of
from ..qtensor import expand_groups
from .base import LayerSpec, Layout, Tuning

EMPTY = (0,)


class Codebook(Layout):
    name = "codebook"
    stored = ("qweight", "widths", "codebook", "codebook_range", "row_scale", "outlier_count", "outlier_row", "outlier_val")
    resizable = True

    @classmethod
    def buffers(cls, layer: LayerSpec) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        out = {"qweight": (torch.uint8, EMPTY), "widths": (torch.uint8, EMPTY), "codebook": (torch.float16, EMPTY)}
        if layer.spec.get("codebook_bits", 16) == 8:
            out["codebook_range"] = (torch.float16, EMPTY)
        if layer.spec.get("row_scale"):
            out["row_scale"] = (torch.float16, EMPTY)
        if layer.spec.get("outliers"):
            out.update(outlier_count=(torch.int16, EMPTY), outlier_row=(torch.int16, EMPTY),
                       outlier_val=(torch.float16, EMPTY))
        return out

    @classmethod
    def weight(cls, state: dict[str, torch.Tensor], layer: LayerSpec) -> CodebookWeight:
        return CodebookWeight.from_packed(state, layer.shape, layer.group_size, layer.spec.get("scale_group", -1))

    @classmethod
    def describe(cls, layer: LayerSpec) -> str:
        return f"layout=codebook, max_bits={layer.bits}, share={layer.group_size}"

    stream_mappings = ("codebook-segments", "codebook-pairs", "codebook-deltas")
    kernels = ("triton",)  # kernels/matmul_triton.segment_matmul: a table lookup per code

    @classmethod
    def kernel_supports(cls, layer: LayerSpec, backend: str) -> bool:
        """Any widths, shares, entry formats and outliers; row scales one per row (the default)."""
        return backend == "triton" and layer.spec.get("scale_group", -1) == -1

    @classmethod
    def prepare_kernel(cls, weight: CodebookWeight, backend: str):
        from ..kernels.matmul_triton import repack_segments
        from ..qcodebook import column_widths

        out_f, in_f = weight.shape
        dev = weight.codes.device
        p = repack_segments(weight.codes, None, column_widths(weight.widths, weight.share, in_f)[None, :])
        p.table = weight.values().to(dev).contiguous()
        off = column_offsets(weight.widths, weight.share, in_f).to(dev)
        p.offsets = off.to(torch.int32)
        if weight.row_scale is not None:
            p.row_scale = weight.row_scale.to(dev, torch.float32).reshape(out_f).contiguous()
        if weight.n_outliers:  # the kernel computes the grid value there; add what the outlier differs by
            r, c = weight.outlier_row.to(dev, torch.long), weight.outlier_cols().to(dev)
            grid = p.table[off[c] + weight.codes[r, c].to(torch.long)]
            if p.row_scale is not None:
                grid = grid * p.row_scale[r]
            p.outliers = (r, c, weight.outlier_val.to(dev, torch.float32) - grid)
        return p

    @classmethod
    def kernel_linear(cls, x: torch.Tensor, prepared, backend: str) -> torch.Tensor:
        from ..kernels.matmul_triton import segment_matmul

        return segment_matmul(x, prepared)

    @classmethod
    def encode_qweight(cls, t, tensors, owner, layer, codec, speed_floor_mbps):
        """One symbol stream, or the packed segments one stream (table) per column width (3-bit segments
        also as code pairs): the smallest."""
        from ..coding import (_codebook_symbols, _column_width_map, _segments, _width_entropy_bits, encode_streams,
                              segment_streams, symbol_payload)

        widths = tensors[f"{owner}.widths"]
        sym = _codebook_symbols(t, widths, layer)
        spec, payload, fields = symbol_payload(sym, "codebook", codec, speed_floor_mbps)
        if codec != "lz4":
            cut = _segments(widths, layer)
            has3 = any(b == 3 for b, _ in cut)  # pairs differ only there
            for mapping in ("codebook-segments", "codebook-pairs")[: 1 + has3]:
                segs = encode_streams(segment_streams(t, cut, mapping == "codebook-pairs"), codec, speed_floor_mbps)
                if len(segs) < len(payload):
                    payload, fields = segs, {"kind": "symbols", "mapping": mapping}
            if fields["mapping"] != "codebook":
                fields["entropy_bits"] = round(_width_entropy_bits(sym, _column_width_map(widths, layer)), 4)
        return spec, payload, fields

    @classmethod
    def side_streams(cls, leaf, t, data, tensors, owner):
        """8-bit codebook entries as gaps to the previous entry less the layer's median gap (`codebook-deltas`)."""
        from ..coding import codebook_delta_streams

        if leaf == "codebook" and t.dtype == torch.uint8:
            return "codebook-deltas", codebook_delta_streams(data, tensors[f"{owner}.widths"].numpy())
        return None

    @classmethod
    def decode_streams(cls, mapping, payload, decoded, owner, layer, needs):
        from .. import codecs
        from ..coding import _segments, merge_codebook_deltas, merge_segment_streams

        if mapping == "codebook-deltas":
            widths = needs("widths", "codebook widths")
            return torch.from_numpy(merge_codebook_deltas(*codecs.read_streams(payload.numpy()), widths.numpy()))
        widths = needs("widths", "column widths")
        return merge_segment_streams(*codecs.read_streams(payload.numpy(), reuse=True), _segments(widths, layer),
                                     pairs=mapping == "codebook-pairs")

    @classmethod
    def decode_symbols(cls, mapping, sym, decoded, owner, layer):
        import numpy as np

        from .. import codecs
        from ..qcodebook import column_widths, pack_segments

        if mapping != "codebook":
            raise codecs.CodecError(f"mapping {mapping} does not belong to a codebook layer")
        out_f, in_f = layer["shape"]
        if sym.size != out_f * in_f:
            raise codecs.CodecError("decoded symbol count does not match the layer shape")
        cw = column_widths(decoded[f"{owner}.widths"], layer["share"], in_f)
        codes = torch.from_numpy(np.ascontiguousarray(sym).reshape(out_f, in_f).copy())
        if bool((codes.to(torch.long) >= (1 << cw)[None, :]).any()):
            raise codecs.CodecError("decoded codes fall outside their column widths")
        return pack_segments(codes, cw)

    @classmethod
    def tuning(cls, weight: CodebookWeight) -> "CodebookTuning":
        return CodebookTuning(weight)


class CodebookTuning(Tuning):
    """The codebook values and row scales move; codes, widths and outliers stay."""

    def __init__(self, qw: CodebookWeight) -> None:
        self.qw = qw
        dev = qw.codes.device
        self.idx = qw.codes.to(torch.long) + column_offsets(qw.widths, qw.share, qw.shape[1]).to(dev)[None, :]
        self.base = {"values": qw.values().to(dev)}
        if qw.row_scale is not None:
            self.base["row_scale"] = qw.row_scale.to(torch.float32)
        self.outliers = None
        if qw.n_outliers:
            self.outliers = (qw.outlier_row.to(torch.long), qw.outlier_cols().to(dev), qw.outlier_val.to(torch.float32))

    def weight(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        qw = self.qw
        W = values["values"][self.idx]
        if "row_scale" in values:
            W = W * expand_groups(values["row_scale"].reshape(qw.shape[0], -1), qw.shape[1], qw.scale_group)
        if self.outliers is not None:
            r, c, v = self.outliers
            W = W.index_put((r, c), v)
        return W

    def stored(self, values: dict[str, torch.Tensor], scale_bits: int) -> dict[str, torch.Tensor]:
        qw, new = self.qw, {}
        v = values["values"]
        if qw.codebook_range is None:
            new["codebook"] = v.to(torch.float16)
        else:  # 8-bit entries on a fresh per-codebook (lo, step) grid
            sizes = (torch.ones_like(qw.widths, dtype=torch.long) << qw.widths.to(torch.long)).to(v.device)
            starts = torch.cumsum(sizes, 0) - sizes
            kmax = int(sizes.max())
            slot = torch.arange(kmax, device=v.device)[None, :]
            valid = slot < sizes[:, None]
            pos = (starts[:, None] + slot).clamp(max=v.numel() - 1)
            padded = torch.where(valid, v[pos], float("inf"))
            _, lo, step = compact_codebooks(padded)
            new["codebook"] = entries_of(padded, lo, step)[valid]
            new["codebook_range"] = torch.stack([lo, step], 1)
        if "row_scale" in values:
            new["row_scale"] = values["row_scale"].to(torch.float16).reshape(qw.row_scale.shape)
        return new
