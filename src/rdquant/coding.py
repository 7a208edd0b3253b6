"""Entropy coding of a quantized layer's tensors (issue: lossless coding of quantized weights).

The packed codes `qweight` become a stream of one symbol per weight, coded by a codec from
`codecs.py`. Three symbol mappings per layer (raw or zero-relative by lower entropy; zero-context
when its payload is smaller):
  - `raw`: the code itself;
  - `zero-relative`: code - zero_point + 2**bits - 1, which lines up the groups' differently shifted
    code distributions (asymmetric grids put weight 0 at a different code in every group);
  - `zero-context`: the codes split into one stream per zero-point value (a context the decoder
    already has), each coded with its own frequency table: a group's zero point says where its
    weights' zero, and so the peak of its code distribution, lies.
  - `zero-context-packed`: the same streams cut from the packed bytes themselves (whole groups of a
    multiple of 8 weights are whole bytes), so a byte coder sees several codes per byte (zstd's Huffman
    stage then comes within ~1% of the entropy) and decoding needs no re-packing: groups are moved
    back as byte rows. Where codes straddle bytes (3 bits: 8 codes in 3 bytes) each stream is split
    into byte planes (byte 0, 1, 2 of every 3), so each table sees one arrangement of fragments.
  - `zero-context-pairs` (3 bits): the same streams as one byte per pair of codes (to_pairs): a third
    more bytes, but no code is cut across bytes, which codes ~1% smaller than the planes.
Other tensors (scales, packed zero points) are coded as raw bytes, 2-byte dtypes optionally as two
byte planes (`planes`: low bytes, then high bytes, each its own stream: a float's exponent byte is far
more predictable than its mantissa byte). Decoding restores the exact stored bytes, so the
artifact's per-tensor sha256 is the same as for the uncoded artifact.
"""

from __future__ import annotations

from dataclasses import dataclass
import math
import os
from typing import Any

import numpy as np
import torch

from . import codecs, packing
from .codecs import CodecSpec
from .errors import RdquantError
from .qcodebook import column_widths, unpack_segments
from .qtensor import expand_groups, num_groups

DEFAULT_SPEED_FLOOR_MBPS = 200.0
MULTI_STREAM = ("zero-context", "zero-context-packed", "zero-context-pairs", "planes", "codebook-segments",
                "codebook-pairs", "mixed-widths", "codebook-deltas")  # mappings stored as a multi-stream blob
DECODE_FIRST = ("qzeros", "widths", "qwidths", "qclusters")  # a layer's tensors that its other tensors decode with
MAPPINGS = (*MULTI_STREAM, "raw", "zero-relative", "codebook", "mixed", "bytes")  # every mapping this reader decodes


@dataclass(frozen=True)
class LayerInfo:
    """What the symbol mapping needs to know about a quantized layer (from the manifest)."""

    shape: tuple[int, int]
    bits: int
    group_size: int
    symmetric: bool

    @classmethod
    def from_manifest(cls, info: dict[str, Any]) -> "LayerInfo":
        return cls(tuple(info["shape"]), info["bits"], info["group_size"], info["symmetric"])


def _zero_grid(info: LayerInfo, qzeros: torch.Tensor | None) -> np.ndarray:
    """Per-weight zero points [out, in] as int16."""
    out_f, in_f = info.shape
    n_g = num_groups(in_f, info.group_size)
    if qzeros is None:
        z = torch.full((out_f, n_g), 1 << (info.bits - 1), dtype=torch.int16)
    else:
        z = packing.unpack(qzeros, info.bits, out_f * n_g).view(out_f, n_g).to(torch.int16)
    return expand_groups(z, in_f, info.group_size).numpy()


def weight_symbols(qweight: torch.Tensor, qzeros: torch.Tensor | None, info: LayerInfo, mapping: str) -> np.ndarray:
    """The layer's symbol stream (uint8, row-major [out, in]) under `mapping`."""
    codes = packing.unpack(qweight, info.bits, info.shape[0] * info.shape[1]).numpy()
    if mapping == "raw":
        return codes
    rel = codes.reshape(info.shape).astype(np.int16) - _zero_grid(info, qzeros) + ((1 << info.bits) - 1)
    return rel.astype(np.uint8).reshape(-1)


def weight_from_symbols(sym: np.ndarray, qzeros: torch.Tensor | None, info: LayerInfo, mapping: str) -> torch.Tensor:
    """Packed qweight bytes from a decoded symbol stream."""
    if mapping == "raw":
        codes = sym
    else:
        rel = sym.reshape(info.shape).astype(np.int16) - ((1 << info.bits) - 1) + _zero_grid(info, qzeros)
        if rel.min(initial=0) < 0 or rel.max(initial=0) >= (1 << info.bits):
            raise codecs.CodecError("decoded symbols fall outside the code range")
        codes = rel.astype(np.uint8)
    codes = np.ascontiguousarray(codes).reshape(-1)
    if not codes.flags.writeable:  # decoded straight from a read-only buffer
        codes = codes.copy()
    return packing.pack(torch.from_numpy(codes), info.bits)


def _weight_order(cells: np.ndarray, info: LayerInfo, G: int, full: bool) -> np.ndarray:
    """Row-major weight indices of the groups `cells`, in that order (ragged last groups handled)."""
    in_f = info.shape[1]
    r, g = np.divmod(cells, num_groups(in_f, info.group_size))
    idx = (r * in_f + g * G)[:, None] + np.arange(G)[None, :]
    return idx.reshape(-1) if full else idx[np.arange(G)[None, :] < np.minimum(G, in_f - g * G)[:, None]]


def _context_cells(info: LayerInfo, qzeros: torch.Tensor) -> tuple[np.ndarray, np.ndarray, int, bool]:
    """(groups sorted by zero point, stable; weights per zero point; group width; all groups full?)."""
    out_f, in_f = info.shape
    n_g = num_groups(in_f, info.group_size)
    G = in_f if info.group_size == -1 else info.group_size
    z = packing.unpack(qzeros, info.bits, out_f * n_g).numpy()
    cells = np.argsort(z, kind="stable")
    full = in_f % G == 0
    if full:
        counts = np.bincount(z, minlength=1 << info.bits).astype(np.int64) * G
    else:
        group_size = np.minimum(G, in_f - np.arange(n_g) * G)
        counts = np.bincount(z, weights=np.tile(group_size, out_f), minlength=1 << info.bits).astype(np.int64)
    return cells, counts, G, full


def context_streams(codes: np.ndarray, info: LayerInfo, qzeros: torch.Tensor) -> list[np.ndarray]:
    """The codes (row-major) cut into mapping `zero-context`'s streams, one per zero point that occurs."""
    cells, counts, G, full = _context_cells(info, qzeros)
    if full:  # whole groups are rows of a [groups, G] view: move rows, not single weights
        grouped = codes.reshape(-1, G)[cells].reshape(-1)
    else:
        grouped = codes[_weight_order(cells, info, G, full)]
    return [s for s in np.split(grouped, np.cumsum(counts)[:-1]) if s.size]


def merge_context_streams(flat: np.ndarray, lengths: list[int], info: LayerInfo, qzeros: torch.Tensor) -> np.ndarray:
    """Inverse of context_streams, from the streams concatenated and their lengths (checked against the
    zero points)."""
    cells, counts, G, full = _context_cells(info, qzeros)
    if list(lengths) != counts[counts > 0].tolist():
        raise codecs.CodecError("context streams do not match the layer's zero points")
    codes = np.empty(info.shape[0] * info.shape[1], dtype=np.uint8)
    if full:
        codes.reshape(-1, G)[cells] = flat.reshape(-1, G)
    else:
        codes[_weight_order(cells, info, G, full)] = flat
    return codes


def encode_context(codes: np.ndarray, info: LayerInfo, qzeros: torch.Tensor, codec: str, speed_floor_mbps: float) -> bytes:
    """One payload per context stream (codec chosen per stream), packed into one blob."""
    return encode_streams(context_streams(codes, info, qzeros), codec, speed_floor_mbps)


def encode_streams(streams: list[np.ndarray], codec: str, speed_floor_mbps: float) -> bytes:
    """Several streams (contexts, planes) in one payload (codecs.encode_streams)."""
    return codecs.encode_streams(streams, codec, speed_floor_mbps, choose_codec)


def byte_period(bits: int) -> int:
    """Bytes after which the packed layout repeats: 8 codes of b bits fill b bytes, and every byte holds
    the same code fragments when b divides 8 (1), else the run of b bytes is the period (3-bit: 3)."""
    return bits // math.gcd(bits, 8)


def packed_context_ok(info: LayerInfo) -> bool:
    """Mapping `zero-context-packed` needs every group to be the same whole number of packed bytes (which
    is then a whole number of byte periods too)."""
    G = info.shape[1] if info.group_size == -1 else info.group_size
    return info.shape[1] % G == 0 and (G * info.bits) % 8 == 0


def packed_context_streams(qweight: torch.Tensor, info: LayerInfo, qzeros: torch.Tensor, pairs: bool = False) -> list[np.ndarray]:
    """The packed code bytes cut into mapping `zero-context-packed`'s streams: the groups of each zero
    point, and when codes straddle bytes (3, 5, 6, 7 bits) each such stream as `byte_period` planes
    (byte k of every period: fragments at the same bit positions, so a byte coder's table fits them),
    plane-major: plane 0 of every zero point's stream, then plane 1, ... With `pairs` (mapping
    `zero-context-pairs`, 3 bits only) each zero point's stream is instead its code pairs (to_pairs)."""
    return _packed_form(_zero_point_rows(qweight, info, qzeros), info.bits, pairs)


def _zero_point_rows(qweight: torch.Tensor, info: LayerInfo, qzeros: torch.Tensor) -> list[np.ndarray]:
    """The packed bytes of the groups of each zero point that occurs (groups sorted by zero point)."""
    cells, counts, G, _ = _context_cells(info, qzeros)
    rows = qweight.numpy().reshape(-1, G * info.bits // 8)[cells].reshape(-1)
    return [s for s in np.split(rows, np.cumsum(counts * info.bits // 8)[:-1]) if s.size]


def _packed_form(streams: list[np.ndarray], bits: int, pairs: bool) -> list[np.ndarray]:
    """Zero-point byte streams as coded: pairs, plane-major byte planes, or as they are (whole codes per byte)."""
    if pairs:
        if bits != 3:
            raise ValueError("code pairs are for 3-bit codes")
        return [to_pairs(s) for s in streams]
    per = byte_period(bits)
    if per == 1:
        return streams
    planes = [plane_streams(s, per) for s in streams]
    return [p[k] for k in range(per) for p in planes]


def merge_packed_context_streams(flat: np.ndarray, lengths: list[int], info: LayerInfo, qzeros: torch.Tensor,
                                 pairs: bool = False) -> torch.Tensor:
    """Inverse of packed_context_streams, from the streams concatenated and their lengths (checked):
    the layer's packed qweight."""
    cells, counts, G, _ = _context_cells(info, qzeros)
    per = byte_period(info.bits)
    nb = counts * info.bits // 8
    nb = nb[nb > 0]
    if pairs and info.bits != 3:
        raise codecs.CodecError("code pairs are for 3-bit codes")
    expect = (nb * 4 // 3).tolist() if pairs else np.tile(nb // per, per).tolist()
    if list(lengths) != expect:
        raise codecs.CodecError("context streams do not match the layer's zero points")
    if pairs:
        flat = from_pairs(flat, out=codecs.scratch("pairs", flat.size * 3 // 4))
    elif per > 1:  # plane-major -> the groups' bytes in order
        flat = interleave(flat, per)
    gb = G * info.bits // 8
    row = np.dtype((np.void, gb))  # a group's bytes as one element: rows move at memcpy speed
    out = np.empty(packing.packed_nbytes(info.shape[0] * info.shape[1], info.bits), dtype=np.uint8)
    out.view(row)[cells] = np.ascontiguousarray(flat).reshape(-1).view(row)
    return torch.from_numpy(out)


def plane_streams(data: np.ndarray, width: int) -> list[np.ndarray]:
    """Mapping `planes`: the bytes of `width`-byte elements as `width` streams (byte 0 of every
    element, then byte 1, ...)."""
    return [np.ascontiguousarray(p) for p in data.reshape(-1, width).T]


def merge_planes(flat: np.ndarray, lengths: list[int], width: int, nbytes: int) -> np.ndarray:
    """Inverse of plane_streams, from the planes concatenated and their lengths."""
    if len(lengths) != width or any(n * width != nbytes for n in lengths):
        raise codecs.CodecError("byte planes do not match the tensor's size")
    return interleave(flat, width)


def interleave(flat: np.ndarray, k: int, out: np.ndarray | None = None) -> np.ndarray:
    """k planes laid end to end -> their elements interleaved (plane j's i-th byte at i*k + j); one plane
    at a time into a strided view, ~4x faster than a transposed copy. `out`: flat.size elements to fill."""
    n = flat.size // k
    view = np.empty((n, k), dtype=flat.dtype) if out is None else out.reshape(n, k)
    for j in range(k):
        view[:, j] = flat[j * n:(j + 1) * n]
    return view.reshape(-1)


def decode_context(payload: np.ndarray, info: LayerInfo, qzeros: torch.Tensor) -> np.ndarray:
    """Codes (row-major, uint8) from an `encode_context` payload."""
    return merge_context_streams(*codecs.read_streams(payload), info, qzeros)


def context_entropy_bits(codes: np.ndarray, info: LayerInfo, qzeros: torch.Tensor) -> float:
    """Bits per symbol of ideal coding per context stream (their order-0 entropies, weighted)."""
    return sum(codecs.entropy_bits(s) * s.size for s in context_streams(codes, info, qzeros)) / max(codes.size, 1)


def mappings_for(bits: int) -> tuple[str, ...]:
    """zero-relative symbols span 2**(bits+1) - 1 values, so they fit a byte only up to 7 bits."""
    return ("raw", "zero-relative") if bits <= 7 else ("raw",)


def best_mapping(qweight: torch.Tensor, qzeros: torch.Tensor | None, info: LayerInfo) -> tuple[str, np.ndarray, float]:
    """(mapping, symbols, entropy bits/symbol) of the lower-entropy mapping (raw wins ties)."""
    best = None
    for mapping in mappings_for(info.bits):
        sym = weight_symbols(qweight, qzeros, info, mapping)
        h = codecs.entropy_bits(sym)
        if best is None or h < best[2] - 1e-9:
            best = (mapping, sym, h)
    return best  # type: ignore[return-value]


def symbol_payload(sym: np.ndarray, mapping: str, codec: str, speed_floor_mbps: float
                   ) -> tuple[CodecSpec, bytes, dict[str, Any]]:
    """(codec spec, payload, manifest fields) of one symbol stream stored under `mapping`: what a layout's
    encode_qweight returns for its plain form."""
    spec, payload = choose_codec(sym, codec, speed_floor_mbps)
    return spec, payload, {"kind": "symbols", "mapping": mapping, "entropy_bits": round(codecs.entropy_bits(sym), 4)}


def choose_codec(data: np.ndarray, codec: str, speed_floor_mbps: float) -> tuple[CodecSpec, bytes]:
    """Encode with the named codec, or for `auto` with the smallest candidate whose nominal decode
    speed is at least the floor (nominal speeds, not timings, so the choice is deterministic)."""
    if codec != "auto":
        spec = CodecSpec.parse(codec)
        return spec, codecs.encode(data, spec)
    best: tuple[CodecSpec, bytes] | None = None
    for name in ("none", *codecs.AUTO_CANDIDATES):
        spec = CodecSpec.parse(name)
        if codecs.NOMINAL_DECODE_MBPS[spec.name] < speed_floor_mbps:
            continue
        payload = codecs.encode(data, spec)
        if best is None or len(payload) < len(best[1]):
            best = (spec, payload)
    assert best is not None
    return best


def encode_tensors(
    tensors: dict[str, torch.Tensor],
    quantized: dict[str, dict[str, Any]],
    codec: str,
    speed_floor_mbps: float = DEFAULT_SPEED_FLOOR_MBPS,
    dense: bool = False,
) -> dict[str, tuple[torch.Tensor, dict[str, Any]]]:
    """Stored form of the tensors that a codec shrinks: name -> (uint8 payload, manifest fields).

    Quantized layers' qweight is coded as symbols, their scales/qzeros as bytes; other tensors only
    with `dense`. A tensor whose best payload is not smaller than its raw bytes stays uncoded.
    """
    from .layouts import layout_named

    stored: dict[str, tuple[torch.Tensor, dict[str, Any]]] = {}
    if codec != "auto":
        try:
            CodecSpec.parse(codec)
        except ValueError as e:
            raise RdquantError(str(e)) from e
    if codec == "none":
        return stored
    for name, t in tensors.items():
        owner, _, leaf = name.rpartition(".")
        layer = quantized.get(owner)
        raw_bytes = t.numel() * t.element_size()
        if layer is not None and leaf == "qweight":  # the layer's layout picks the codes' symbol mapping
            spec, payload, fields = layout_named(layer.get("layout", "affine")).encode_qweight(
                t, tensors, owner, layer, codec, speed_floor_mbps)
        elif layer is not None or dense:
            data = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
            spec, payload = choose_codec(data, codec, speed_floor_mbps)
            fields = {"kind": "bytes"}
            streams = None  # a multi-stream form, kept when smaller
            if t.element_size() == 2 and t.is_floating_point():  # byte planes
                mapping, streams = "planes", plane_streams(data, 2)
            elif layer is not None and codec != "lz4":  # a layout's own multi-stream form of a side tensor
                found = layout_named(layer.get("layout", "affine")).side_streams(leaf, t, data, tensors, owner)
                if found is not None:
                    mapping, streams = found
            if streams is not None:
                alt = encode_streams(streams, codec, speed_floor_mbps)
                if len(alt) < len(payload):
                    payload, fields = alt, {"kind": "bytes", "mapping": mapping}
        else:
            continue
        if spec.name == "none" or len(payload) >= raw_bytes:
            continue
        name_of = codec if fields.get("mapping") in MULTI_STREAM else str(spec)  # streams choose their own
        stored[name] = (torch.frombuffer(bytearray(payload), dtype=torch.uint8), {"codec": name_of, **fields})
    return stored


def decode_tensor(
    name: str,
    payload: torch.Tensor,
    entry: dict[str, Any],
    quantized: dict[str, dict[str, Any]],
    decoded: dict[str, torch.Tensor],
) -> torch.Tensor:
    """Decode one stored tensor to its manifest dtype/shape; a qweight needs its layer's qzeros
    (decoded, or uncoded) in `decoded` when the layer is asymmetric."""
    from .layouts import layout_named

    codec = entry["codec"]
    owner = name.rpartition(".")[0]
    if "mapping" in codec and codec["mapping"] not in MAPPINGS:
        raise codecs.CodecError(f"unknown mapping {codec['mapping']!r} (written by a newer rdquant?)")
    def needs(leaf: str, what: str) -> torch.Tensor:  # the layer's decoded tensor that this mapping decodes with
        if f"{owner}.{leaf}" not in decoded:
            raise codecs.CodecError(f"mapping {codec['mapping']} needs the layer's {what}")
        return decoded[f"{owner}.{leaf}"]

    layer = quantized.get(owner)
    layout = layout_named(layer.get("layout", "affine")) if layer is not None else None
    if layout is not None and codec.get("mapping") in layout.stream_mappings:  # the layout's multi-stream forms
        return layout.decode_streams(codec["mapping"], payload, decoded, owner, layer, needs)
    if codec.get("mapping") == "planes":
        dtype = getattr(torch, entry["dtype"])
        nbytes = int(np.prod(entry["shape"], dtype=np.int64)) * torch.empty(0, dtype=dtype).element_size()
        data = merge_planes(*codecs.read_streams(payload.numpy()), 2, nbytes)
        return torch.from_numpy(data).view(dtype).reshape(entry["shape"])
    sym = codecs.decode(payload.numpy())
    if codec["kind"] == "bytes":
        dtype = getattr(torch, entry["dtype"])
        return torch.from_numpy(sym.copy()).view(dtype).reshape(entry["shape"])
    if layout is None:
        raise codecs.CodecError(f"mapping {codec['mapping']} is for a quantized layer's codes")
    return layout.decode_symbols(codec["mapping"], sym, decoded, owner, layer)


def _mixed_cells(tensors: dict[str, torch.Tensor], owner: str, layer: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A mixed layer's per-cell widths and row clusters (if any), from its qwidths and qclusters (checked)."""
    from .qtensor import num_groups

    out_f, in_f = layer["shape"]
    clusters = tensors.get(f"{owner}.qclusters")
    cells = (int(layer["clusters"]), in_f) if layer.get("clusters") else (out_f, num_groups(in_f, layer["group_size"]))
    if (clusters is None) != (not layer.get("clusters")) or (clusters is not None and (
            clusters.numel() != out_f or int(clusters.min()) < 0 or int(clusters.max()) >= cells[0])):
        raise codecs.CodecError(f"{owner}: row clusters do not match the manifest")
    return packing.unpack(tensors[f"{owner}.qwidths"], layer["width_bits"], cells[0] * cells[1]).view(*cells), clusters


def _mixed_width_map(tensors: dict[str, torch.Tensor], owner: str, layer: dict[str, Any]) -> torch.Tensor:
    """A mixed layer's cell widths broadcast to one per weight [out, in] (from its qwidths, qclusters)."""
    from .qmixed import width_map

    widths, clusters = _mixed_cells(tensors, owner, layer)
    return width_map(widths, tuple(layer["shape"]), layer["group_size"], clusters)


def _mixed_segments(tensors: dict[str, torch.Tensor], owner: str, layer: dict[str, Any]) -> list[tuple[int, int]]:
    """(width, packed bytes) of a mixed layer's qweight segments, in stored order (qmixed.pack_by_width)."""
    from .qmixed import width_counts

    widths, clusters = _mixed_cells(tensors, owner, layer)
    counts = width_counts(widths, tuple(layer["shape"]), layer["group_size"], clusters)
    return [(b, packing.packed_nbytes(counts[b], b)) for b in range(1, 9) if counts[b]]


def _segments(widths: torch.Tensor, layer: dict[str, Any]) -> list[tuple[int, int]]:
    """(width, packed bytes) of a codebook layer's qweight segments, in stored order (qcodebook.pack_segments)."""
    out_f, in_f = layer["shape"]
    cw = column_widths(widths, layer["share"], in_f)
    return [(b, packing.packed_nbytes(out_f * int((cw == b).sum()), b)) for b in sorted(set(cw.tolist()) - {0})]


def segment_streams(qweight: torch.Tensor, segs: list[tuple[int, int]], pairs: bool = False) -> list[np.ndarray]:
    """A qweight stored as one packed segment per width (`segs`: (width, bytes) in order), one stream
    (its own table) per segment, as `byte_period` planes where codes straddle bytes: mappings
    `codebook-segments` (codebook layers). With `pairs` (`codebook-pairs`, `mixed-widths`) 3-bit
    segments are one stream of code pairs, a pair per byte (to_pairs), so no code is cut in two."""
    data, streams, pos = qweight.numpy(), [], 0
    for b, n in segs:
        seg, per = data[pos:pos + n], byte_period(b)
        streams += [seg] if per == 1 else [to_pairs(seg)] if pairs and b == 3 else plane_streams(seg, per)
        pos += n
    return streams


def merge_segment_streams(flat: np.ndarray, lengths: list[int], segs: list[tuple[int, int]], pairs: bool = False) -> torch.Tensor:
    """Inverse of segment_streams (stream lengths checked against the segments): the packed qweight."""
    # per segment: (streams, bytes per stream); pair form is one stream, 4 bytes per 3 packed
    form = [(1, n * 4 // 3) if pairs and b == 3 else (byte_period(b), n // byte_period(b)) for b, n in segs]
    if list(lengths) != [m for k, m in form for _ in range(k)]:
        raise codecs.CodecError("the streams do not match the layer's width segments")
    out, pos, src = np.empty(sum(n for _, n in segs), dtype=np.uint8), 0, 0
    for (b, n), (k, m) in zip(segs, form):
        part, dst = flat[src:src + k * m], out[pos:pos + n]
        if pairs and b == 3:
            from_pairs(part, out=dst)
        else:
            interleave(part, k, out=dst)
        src, pos = src + k * m, pos + n
    return torch.from_numpy(out)


def to_pairs(packed3: np.ndarray) -> np.ndarray:
    """Packed 3-bit codes (8 codes c0..c7 in 3 bytes, FORMAT.md) -> one byte per code pair c_2k | c_2k+1 << 3:
    a run's 24 bits are four 6-bit fields, so 3 bytes become 4 and no code straddles a byte."""
    r = packed3.reshape(-1, 3).astype(np.uint32)
    v = r[:, 0] | (r[:, 1] << 8) | (r[:, 2] << 16)
    return np.stack([(v >> s) & 63 for s in (0, 6, 12, 18)], 1).astype(np.uint8).reshape(-1)


_PAIR_BLOCK = 1 << 14  # 8-byte words per step of from_pairs: its temporaries stay in L2 (4x fewer
# memory round trips than whole-array numpy steps: 24 ms against 70 for 53 MB of pairs on this CPU)
_U64 = [np.uint64(c) for c in (0xC0C0C0C0C0C0C0C0, 0x003F003F003F003F, 0x0FC00FC00FC00FC0, 0x00FFF00000FFF000,
                               0x00000FFF00000FFF, 0xFFFFFF000000, 0xFFFFFF, 2, 4, 8)]
_SIX = np.dtype([("lo", "<u4"), ("hi", "<u2")])  # the 6 packed bytes of two runs


def from_pairs(pairs: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Inverse of to_pairs: every 8 pair bytes (two runs, a little-endian 64-bit word) -> their 6 packed
    bytes, on blocks small enough to stay in cache; a last odd run alone. `out`: a uint8 buffer of
    pairs.size * 3 // 4 bytes to write into."""
    if pairs.size % 4:
        raise codecs.CodecError("code pairs do not fill whole 3-bit runs")
    flat = np.ascontiguousarray(pairs).reshape(-1)
    if out is None:
        out = np.empty(flat.size * 3 // 4, dtype=np.uint8)
    elif out.size != flat.size * 3 // 4:
        raise ValueError("from_pairs: output buffer has the wrong size")
    whole = flat.size // 8
    words, six = flat[: whole * 8].view("<u8"), out[: whole * 6].view(_SIX)
    x = np.empty(min(_PAIR_BLOCK, max(whole, 1)), dtype=np.uint64)
    y = np.empty_like(x)
    for s in range(0, whole, _PAIR_BLOCK):
        xx = _squeeze_pairs(words[s:s + _PAIR_BLOCK], x, y)
        part = six[s:s + xx.size]
        part["lo"] = xx
        xx >>= np.uint64(32)
        part["hi"] = xx
    if flat.size % 8:  # one run left: its 4 pair bytes as the low half of a word
        last = np.zeros(1, dtype="<u8")
        last.view(np.uint8)[:4] = flat[-4:]
        out[whole * 6:] = _squeeze_pairs(last, x, y).view(np.uint8)[:3]
    return out


def _squeeze_pairs(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pair words -> their packed runs (48 bits per word, in the low bits), in x[:w.size] (y: scratch of
    the same size). Three shift-and-mask steps: 6-bit fields -> 12 -> 24 -> 48 bits."""
    high, m0, m1, m2, m3, m4, m5, two, four, eight = _U64
    xx, yy = x[:w.size], y[:w.size]
    np.bitwise_and(w, high, out=xx)
    if xx.any():
        raise codecs.CodecError("decoded code pairs fall outside 6 bits")
    np.bitwise_and(w, m0, out=xx)  # fields 0, 2, 4, 6 in place; 1, 3, 5, 7 moved down 2 bits
    np.right_shift(w, two, out=yy)
    yy &= m1
    xx |= yy
    np.right_shift(xx, four, out=yy)  # 12-bit pairs of fields -> 24-bit runs
    yy &= m2
    xx &= m3
    xx |= yy
    np.right_shift(xx, eight, out=yy)  # two 24-bit runs -> 48 bits
    yy &= m4
    xx &= m5
    xx |= yy
    return xx


def _width_entropy_bits(sym: np.ndarray, widths: np.ndarray) -> float:
    """Bits per symbol of ideal coding with one table per code width (`widths`: each symbol's width,
    any shape of sym's size): codebook layers' column widths, mixed layers' cell widths."""
    w = widths.reshape(-1)
    return sum(codecs.entropy_bits(sym[w == b]) * int((w == b).sum()) for b in np.unique(w)) / max(sym.size, 1)


def _column_width_map(widths: torch.Tensor, layer: dict[str, Any]) -> np.ndarray:
    """A codebook layer's column widths, one per weight [out, in] (a broadcast view)."""
    return np.broadcast_to(column_widths(widths, layer["share"], layer["shape"][1]).numpy(), tuple(layer["shape"]))


def _codebook_symbols(qweight: torch.Tensor, widths: torch.Tensor, layer: dict[str, Any]) -> np.ndarray:
    """A codebook layer's codes, one symbol per weight, row-major [out, in] (mapping `codebook`)."""
    out_f, in_f = layer["shape"]
    codes = unpack_segments(qweight, column_widths(widths, layer["share"], in_f), out_f)
    return codes.reshape(-1).numpy()


def _codebook_layout(widths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Of a flat array of codebooks with these widths (0..8): (each entry's index in a [9, 256] table
    by (its codebook's width, its position in that codebook), each codebook's start, each one's size)."""
    w = widths.astype(np.int64)
    sizes = np.left_shift(1, w)
    ends = np.cumsum(sizes)
    starts = ends - sizes
    return np.arange(int(ends[-1]) if w.size else 0) + np.repeat(w * 256 - starts, sizes), starts, sizes


def codebook_delta_streams(codebook: np.ndarray, widths: np.ndarray) -> list[np.ndarray]:
    """Mapping `codebook-deltas` (8-bit codebook entries, FORMAT.md), one stream: the median difference
    of consecutive entries at each position among the codebooks of each width (widths ascending), then
    every entry's difference from the entry before it in its codebook (mod 256) minus that median, in
    codebook order. Ascending K-means entries (0 ... 255 on their lo/step grid) have similar gaps, which
    the residuals expose to the byte coder; any entries round-trip exactly."""
    cell, starts, _ = _codebook_layout(widths)
    d = np.diff(codebook.astype(np.int16), prepend=0)
    d[starts] = codebook[starts]
    table, medians = np.zeros(9 * 256, dtype=np.int16), []
    for b in np.unique(widths).tolist():
        medians.append(np.median(d[cell // 256 == b].reshape(-1, 1 << b) & 0xFF, axis=0).astype(np.int16))
        table[b * 256:b * 256 + (1 << b)] = medians[-1]
    return [np.concatenate([*medians, (d - table[cell]) & 0xFF]).astype(np.uint8)]


def merge_codebook_deltas(flat: np.ndarray, lengths: list[int], widths: np.ndarray) -> np.ndarray:
    """Inverse of codebook_delta_streams (the stream's length checked against the widths): the flat codebook."""
    if widths.size and int(widths.max()) > 8:
        raise codecs.CodecError("codebook widths above 8 bits")
    cell, starts, sizes = _codebook_layout(widths)
    present = np.flatnonzero(np.bincount(widths, minlength=9)).tolist()
    n_med = sum(1 << b for b in present)
    if list(lengths) != [n_med + cell.size]:
        raise codecs.CodecError("the codebook stream does not match the layer's widths")
    table, pos = np.zeros(9 * 256, dtype=np.uint8), 0
    for b in present:
        table[b * 256:b * 256 + (1 << b)] = flat[pos:pos + (1 << b)]
        pos += 1 << b
    run = np.cumsum(flat[n_med:] + table[cell], dtype=np.uint8)  # uint8: sums wrap mod 256
    return run - np.repeat(np.concatenate([np.zeros(1, np.uint8), run])[starts], sizes)


def recode(
    src: str | os.PathLike,
    out: str | os.PathLike,
    codec: str = "auto",
    speed_floor_mbps: float = DEFAULT_SPEED_FLOOR_MBPS,
    dense: bool = False,
    overwrite: bool = False,
):
    """Write a copy of artifact `src` at `out` with its tensors (re)coded by `codec`; the decoded
    tensors, and so the model, are bit-identical."""
    import shutil
    from pathlib import Path

    from .artifact import MANIFEST, read_tensors, write_artifact

    src, out = Path(src), Path(out)
    manifest, tensors = read_tensors(src)
    stored = encode_tensors(tensors, manifest["quantized"], codec, speed_floor_mbps, dense)
    keep = {k: v for k, v in manifest.items() if k not in ("format", "format_version", "files", "tensors")}
    keep["codec"] = {"requested": codec, "speed_floor_mbps": speed_floor_mbps, "dense": dense}
    extras = [f for f in src.iterdir() if f.is_file() and f.name != MANIFEST and not f.name.endswith(".safetensors")]
    write_artifact(out, tensors, keep, {f.name: (lambda d, f=f: shutil.copy2(f, Path(d) / f.name)) for f in extras},
                   overwrite=overwrite, stored=stored)
    return out
