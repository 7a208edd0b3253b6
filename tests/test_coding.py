"""Entropy-coded artifacts: bit-exact round trips, damage detection, deterministic codec choice."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rdquant
from rdquant import codecs, packing
from rdquant.artifact import MANIFEST
from rdquant.coding import (LayerInfo, best_mapping, context_entropy_bits, context_streams, decode_context,
                            encode_context, mappings_for, merge_packed_context_streams, merge_planes, packed_context_ok,
                            byte_period,
                            packed_context_streams, plane_streams, recode, weight_from_symbols, weight_symbols)
from rdquant.models import load_model


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), rows=st.integers(1, 9), cols=st.integers(1, 70),
       group=st.sampled_from([-1, 8, 16, 24]), sym=st.booleans(), seed=st.integers(0, 9999))
def test_symbol_mappings_round_trip(bits, rows, cols, group, sym, seed):
    g = torch.Generator().manual_seed(seed)
    n_g = 1 if group == -1 else -(-cols // group)
    codes = torch.randint(0, 1 << bits, (rows, cols), generator=g, dtype=torch.uint8)
    qzeros = None if sym else packing.pack(torch.randint(0, 1 << bits, (rows, n_g), generator=g), bits)
    qweight = packing.pack(codes, bits)
    info = LayerInfo((rows, cols), bits, group, sym)
    for mapping in mappings_for(bits):
        s = weight_symbols(qweight, qzeros, info, mapping)
        assert torch.equal(weight_from_symbols(s, qzeros, info, mapping), qweight)


def test_zero_relative_mapping_lowers_entropy_of_shifted_groups():
    rng = np.random.default_rng(0)
    rows, cols, g, bits = 64, 256, 64, 3
    zeros = rng.integers(1, 7, (rows, cols // g))
    codes = np.clip(np.round(rng.normal(0, 0.8, (rows, cols))) + np.repeat(zeros, g, 1), 0, 7)
    qweight = packing.pack(torch.from_numpy(codes.astype(np.uint8)), bits)
    qzeros = packing.pack(torch.from_numpy(zeros.astype(np.uint8)), bits)
    mapping, _, h = best_mapping(qweight, qzeros, LayerInfo((rows, cols), bits, g, False))
    assert mapping == "zero-relative"
    assert h < codecs.entropy_bits(codes.astype(np.uint8)) - 0.3


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([2, 3, 4]), rows=st.integers(1, 9), cols=st.integers(1, 70),
       group=st.sampled_from([-1, 8, 24]), seed=st.integers(0, 9999), codec=st.sampled_from(["ans", "auto", "zstd-3"]))
def test_zero_context_streams_round_trip(bits, rows, cols, group, seed, codec):
    g = torch.Generator().manual_seed(seed)
    n_g = 1 if group == -1 else -(-cols // group)
    codes = torch.randint(0, 1 << bits, (rows, cols), generator=g, dtype=torch.uint8).numpy().reshape(-1)
    zeros = torch.randint(0, 1 << bits, (rows, n_g), generator=g)
    info = LayerInfo((rows, cols), bits, group, False)
    qz = packing.pack(zeros, bits)
    z_of = np.repeat(zeros.numpy(), cols if group == -1 else group, 1)[:, :cols].reshape(-1)
    order = np.argsort(z_of, kind="stable")  # grouped by zero point, row-major within each
    streams = context_streams(codes, info, qz)
    assert np.array_equal(np.concatenate(streams), codes[order])  # the fast path (whole groups) agrees
    blob = encode_context(codes, info, qz, codec, 0.0)
    assert np.array_equal(decode_context(np.frombuffer(blob, dtype=np.uint8), info, qz), codes)
    with pytest.raises(codecs.CodecError):
        decode_context(np.frombuffer(blob[:-1], dtype=np.uint8), info, qz)


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 6, 8]), rows=st.integers(1, 9), n_g=st.integers(1, 5),
       group=st.sampled_from([-1, 8, 16, 24]), seed=st.integers(0, 9999))
def test_packed_context_streams_round_trip_and_match_the_symbol_streams(bits, rows, n_g, group, seed):
    g = torch.Generator().manual_seed(seed)
    cols = 8 * n_g if group == -1 else group * n_g
    n_g = 1 if group == -1 else n_g
    codes = torch.randint(0, 1 << bits, (rows, cols), generator=g, dtype=torch.uint8)
    qz = packing.pack(torch.randint(0, 1 << bits, (rows, n_g), generator=g), bits)
    info = LayerInfo((rows, cols), bits, group, False)
    assert packed_context_ok(info)
    qweight = packing.pack(codes, bits)
    segs = packed_context_streams(qweight, info, qz)
    per = byte_period(bits)  # straddling widths: each stream as byte planes, plane-major
    assert per == (3 if bits in (3, 6) else 1) and len(segs) % per == 0
    n_ctx = len(segs) // per
    joined = [np.stack([segs[k * n_ctx + c] for k in range(per)], 1).reshape(-1) for c in range(n_ctx)]
    sym = context_streams(codes.numpy().reshape(-1), info, qz)  # the same streams, one code per byte
    assert [packing.unpack(torch.from_numpy(s.copy()), bits, t.size).numpy().tolist() for s, t in zip(joined, sym)] == \
        [t.tolist() for t in sym]
    flat, lengths = np.concatenate(segs), [s.size for s in segs]
    assert torch.equal(merge_packed_context_streams(flat, lengths, info, qz), qweight)
    with pytest.raises(codecs.CodecError):
        merge_packed_context_streams(flat[:-1], lengths[:-1] + [lengths[-1] - 1], info, qz)
    if bits == 3:  # zero-context-pairs: each context stream as one byte per code pair
        pairs = packed_context_streams(qweight, info, qz, pairs=True)
        assert [p.tolist() for p in pairs] == [(t[0::2] | (t[1::2] << 3)).tolist() for t in sym]
        flat, lengths = np.concatenate(pairs), [s.size for s in pairs]
        assert torch.equal(merge_packed_context_streams(flat, lengths, info, qz, pairs=True), qweight)
        with pytest.raises(codecs.CodecError):
            merge_packed_context_streams(flat, lengths, info, qz)  # read as planes


def test_packed_context_needs_whole_byte_groups():
    assert not packed_context_ok(LayerInfo((4, 70), 3, 8, False))  # ragged last group
    assert not packed_context_ok(LayerInfo((4, 12), 3, 4, False))  # 4 codes of 3 bits: not whole bytes
    assert packed_context_ok(LayerInfo((4, 576), 3, 64, False))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 300), seed=st.integers(0, 9999), dtype=st.sampled_from([torch.float16, torch.bfloat16]))
def test_byte_planes_round_trip(n, seed, dtype):
    t = torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(dtype)
    data = t.view(torch.uint8).numpy()
    planes = plane_streams(data, 2)
    assert np.array_equal(planes[1], data[1::2])  # the high bytes (sign, exponent) form one plane
    assert np.array_equal(merge_planes(np.concatenate(planes), [p.size for p in planes], 2, data.size), data)
    with pytest.raises(codecs.CodecError):
        merge_planes(np.concatenate(planes)[:-1], [n, n - 1] if n else [0], 2, data.size)


def test_zero_context_lowers_entropy_when_the_zero_point_predicts_the_codes():
    rng = np.random.default_rng(1)
    rows, cols, g, bits = 64, 256, 32, 2
    zeros = rng.integers(0, 4, (rows, cols // g))
    # the peak moves with the zero point, but not by a shift (zero-relative symbols cannot line it up)
    codes = np.where(rng.random((rows, cols)) < 0.8, 3 - np.repeat(zeros, g, 1), rng.integers(0, 4, (rows, cols))).astype(np.uint8)
    info = LayerInfo((rows, cols), bits, g, False)
    qz = packing.pack(torch.from_numpy(zeros.astype(np.uint8)), bits)
    h = context_entropy_bits(codes.reshape(-1), info, qz)
    assert h < best_mapping(packing.pack(torch.from_numpy(codes), bits), qz, info)[2] - 0.5


@pytest.fixture(scope="module")
def packed_artifact(tmp_path_factory):
    from rdquant.testing import save_tiny_model_dir

    d = tmp_path_factory.mktemp("coding")
    model, tok, mid = load_model(str(save_tiny_model_dir(d / "tiny")))
    cfg = rdquant.CompressConfig(bits=3, group_size=32, calib_samples=8, calib_seqlen=64, batch_size=4)
    return rdquant.compress(model, cfg, tokenizer=tok, progress=False).save(d / "packed")


def test_packed_context_and_planes_chosen_on_a_real_sized_layer():
    """zstd over packed bytes per zero-point stream, and fp16 scales as byte planes, beat the plain
    payloads on a layer shaped like the default model's (peaked codes, smooth scales); both decode exactly."""
    from rdquant.coding import decode_tensor, encode_tensors

    rng = np.random.default_rng(0)
    rows, cols, g, bits = 256, 576, 64, 2
    zeros = rng.integers(1, 3, (rows, cols // g))
    codes = np.clip(np.round(rng.normal(0, 0.7, (rows, cols))) + np.repeat(zeros, g, 1), 0, 3).astype(np.uint8)
    scales = torch.from_numpy(np.exp(rng.normal(-5, 0.3, (rows, cols // g)))).to(torch.float16)
    tensors = {"l.qweight": packing.pack(torch.from_numpy(codes), bits), "l.scales": scales,
               "l.qzeros": packing.pack(torch.from_numpy(zeros.astype(np.uint8)), bits)}
    layer = {"shape": [rows, cols], "bits": bits, "group_size": g, "symmetric": False}
    stored = encode_tensors(tensors, {"l": layer}, "zstd-19")
    assert stored["l.qweight"][1]["mapping"] == "zero-context-packed"
    assert stored["l.scales"][1]["mapping"] == "planes"
    decoded = {}
    for name in ("l.scales", "l.qzeros", "l.qweight"):
        if name not in stored:
            decoded[name] = tensors[name]
            continue
        entry = {"codec": stored[name][1], "dtype": str(tensors[name].dtype).removeprefix("torch."),
                 "shape": list(tensors[name].shape)}
        decoded[name] = decode_tensor(name, stored[name][0], entry, {"l": layer}, decoded)
        assert torch.equal(decoded[name], tensors[name])


@pytest.mark.parametrize("codec", ["zstd-19", "lz4", "ans", "auto"])
def test_coded_artifact_loads_bit_identical(packed_artifact, tmp_path, codec):
    coded = recode(packed_artifact, tmp_path / codec, codec=codec, speed_floor_mbps=0 if codec == "auto" else 200)
    a, b = rdquant.load(packed_artifact), rdquant.load(coded)
    x = torch.arange(1, 30).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(a(x).logits, b(x).logits)
    manifest = json.loads((coded / MANIFEST).read_text())
    if codec != "lz4":  # lz4 has no entropy stage: it may leave every tensor uncoded, as designed
        assert any("codec" in e for e in manifest["tensors"].values())
    rep = rdquant.inspect(coded)
    assert rep.quantized_stored_bytes <= rep.quantized_bytes
    back = recode(coded, tmp_path / f"{codec}-none", codec="none")
    assert rdquant.inspect(back).quantized_stored_bytes == rep.quantized_bytes


def test_codec_choice_is_deterministic(packed_artifact, tmp_path):
    m1 = json.loads((recode(packed_artifact, tmp_path / "a", codec="auto") / MANIFEST).read_text())
    m2 = json.loads((recode(packed_artifact, tmp_path / "b", codec="auto") / MANIFEST).read_text())
    strip = lambda m: {k: v for k, v in m["tensors"].items()}
    assert strip(m1) == strip(m2)


def test_damaged_coded_tensor_is_named(packed_artifact, tmp_path):
    coded = recode(packed_artifact, tmp_path / "ans", codec="ans")
    manifest = json.loads((coded / MANIFEST).read_text())
    name = next(n for n, e in manifest["tensors"].items() if e.get("codec", {}).get("kind") == "symbols")
    f = coded / "model.safetensors"
    data = bytearray(f.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    off = header + json.loads(data[8:header])[name]["data_offsets"][0] + 40
    data[off] ^= 0x10
    f.write_bytes(bytes(data))
    with pytest.raises(rdquant.ArtifactError, match=name.replace(".", r"\.")):
        rdquant.load(coded)


def test_unknown_codec_is_a_clear_error(packed_artifact, tmp_path):
    with pytest.raises(rdquant.RdquantError, match="unknown codec"):
        recode(packed_artifact, tmp_path / "x", codec="brotli")


def test_lazy_load_decodes_a_layer_on_first_use(packed_artifact, tmp_path):
    from rdquant.runtime import QuantLinear

    coded = recode(packed_artifact, tmp_path / "lazy", codec="ans")
    eager, lazy = rdquant.load(coded), rdquant.load(coded, lazy=True)
    pending = [m for m in lazy.modules() if isinstance(m, QuantLinear) and m._loader is not None]
    linears = [m for m in lazy.modules() if isinstance(m, QuantLinear) and m.kind == "linear"]
    assert pending and pending == linears  # the decoder linears; the embedding and head are read at once
    x = torch.arange(1, 20).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(eager(x).logits, lazy(x).logits)
    assert all(m._loader is None for m in pending)


def test_codebook_segments_round_trip_and_are_chosen_over_one_stream():
    """A codebook layer's qweight is one packed segment per column width: coded as one stream (planes at
    3 bits) per width it beats one mixed-width symbol stream, and decodes to the same bytes."""
    from rdquant.coding import _segments, decode_tensor, encode_tensors, merge_segment_streams, segment_streams
    from rdquant.qcodebook import pack_segments

    rng = np.random.default_rng(3)
    out_f, in_f = 256, 96
    widths = torch.from_numpy(rng.choice([0, 2, 3, 4], in_f).astype(np.uint8))
    codes = np.zeros((out_f, in_f), dtype=np.uint8)
    for c, w in enumerate(widths.tolist()):
        if w:  # peaked, as K-means codes of a bell-shaped column are
            codes[:, c] = np.clip(np.round(rng.normal((1 << w) / 2, (1 << w) / 6, out_f)), 0, (1 << w) - 1)
    qweight = pack_segments(torch.from_numpy(codes), widths.to(torch.long))
    layer = {"shape": [out_f, in_f], "share": 1, "layout": "codebook", "bits": 8, "group_size": 1, "symmetric": False}
    cut = _segments(widths, layer)
    segs = segment_streams(qweight, cut)
    assert len(segs) == 1 + 3 + 1  # 2-bit, 3-bit as three planes, 4-bit
    flat, lengths = np.concatenate(segs), [s.size for s in segs]
    assert torch.equal(merge_segment_streams(flat, lengths, cut), qweight)
    with pytest.raises(codecs.CodecError):
        merge_segment_streams(flat[:-1], lengths[:-1] + [lengths[-1] - 1], cut)
    pairs = segment_streams(qweight, cut, pairs=True)
    assert len(pairs) == 1 + 1 + 1 and pairs[1].size == segs[1].size * 4  # 3-bit: one pair per byte
    flat, lengths = np.concatenate(pairs), [s.size for s in pairs]
    assert torch.equal(merge_segment_streams(flat, lengths, cut, pairs=True), qweight)
    with pytest.raises(codecs.CodecError):
        merge_segment_streams(flat, lengths, cut)  # read as the other mapping
    stored = encode_tensors({"l.widths": widths, "l.qweight": qweight}, {"l": layer}, "zstd-19")
    payload, fields = stored["l.qweight"]
    assert fields["mapping"] in ("codebook-segments", "codebook-pairs") and payload.numel() < qweight.numel()
    entry = {"codec": fields, "dtype": "uint8", "shape": list(qweight.shape)}
    assert torch.equal(decode_tensor("l.qweight", payload, entry, {"l": layer}, {"l.widths": widths}), qweight)


@pytest.mark.parametrize("clustered", [False, True])
def test_mixed_width_streams_round_trip_and_are_chosen_over_one_stream(clustered):
    """A mixed layer's qweight is one packed segment per cell width: one stream (table) per width, 3-bit
    codes as pairs and 5-bit as planes, codes smaller than one symbol stream over all widths, decodes
    to the same bytes, and rejects streams that do not match the widths or hold no pairs."""
    from rdquant.coding import _mixed_segments, decode_tensor, encode_tensors, merge_segment_streams, segment_streams
    from rdquant.config import CompressConfig
    from rdquant.methods.cvxq import row_clusters
    from rdquant.methods.gptq import mixed_rtn
    from rdquant.qmixed import unpack_by_width, width_counts

    g = torch.Generator().manual_seed(4)
    W = torch.randn(192, 100, generator=g) ** 3  # heavy-tailed: peaked codes on min-max grids
    clusters = row_clusters(W, torch.ones(100), 64) if clustered else None
    shape = (3, 100) if clustered else (192, 2)
    widths = torch.tensor([0, 2, 3, 5, 8])[torch.randint(0, 5, shape, generator=g)]
    q = mixed_rtn(W, widths, CompressConfig(group_size=64), 8, None, clusters)
    state = q.packed_state()
    layer = {"shape": [192, 100], "group_size": 64, **q.spec()}
    tensors = {f"l.{k}": v for k, v in state.items()}
    wmap = q.cell_map(q.widths)
    counts = torch.bincount(wmap.reshape(-1).long(), minlength=9).tolist()
    assert width_counts(q.widths, (192, 100), 64, clusters) == counts  # from the cells, no per-weight map
    cut = _mixed_segments(tensors, "l", layer)
    assert cut == [(b, packing.packed_nbytes(counts[b], b)) for b in (2, 3, 5, 8)]
    streams = segment_streams(state["qweight"], cut, pairs=True)
    assert len(streams) == 1 + 1 + 5 + 1 and streams[1].size == packing.packed_nbytes(int((wmap == 3).sum()), 3) * 4 // 3  # pairs
    flat, lengths = np.concatenate(streams), [s.size for s in streams]
    assert torch.equal(merge_segment_streams(flat, lengths, cut, pairs=True), state["qweight"])
    with pytest.raises(codecs.CodecError, match="do not match"):
        merge_segment_streams(flat[:-1], lengths[:-1] + [lengths[-1] - 1], cut, pairs=True)
    bad = flat.copy()
    bad[lengths[0]] = 0x40  # a pair byte with bit 6 set
    with pytest.raises(codecs.CodecError, match="outside"):
        merge_segment_streams(bad, lengths, cut, pairs=True)
    stored = encode_tensors(tensors, {"l": layer}, "zstd-19")
    payload, fields = stored["l.qweight"]
    assert fields["mapping"] == "mixed-widths"
    sym = unpack_by_width(state["qweight"], wmap).reshape(-1).numpy()  # mapping `mixed`: one stream
    assert payload.numel() < len(codecs.encode(sym, "zstd-19"))
    assert fields["entropy_bits"] < codecs.entropy_bits(sym)
    entry = {"codec": fields, "dtype": "uint8", "shape": list(state["qweight"].shape)}
    decoded = {k: v for k, v in tensors.items() if not k.endswith("qweight")}
    assert torch.equal(decode_tensor("l.qweight", payload, entry, {"l": layer}, decoded), state["qweight"])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 7), max_size=200))
def test_code_pairs_round_trip_and_reject_bad_bytes(codes):
    from rdquant.coding import from_pairs, to_pairs

    codes = torch.tensor(codes + [0] * (-len(codes) % 8), dtype=torch.uint8)
    packed = packing.pack(codes, 3).numpy()
    pairs = to_pairs(packed)
    c = codes.numpy()
    assert np.array_equal(pairs, c[0::2] | (c[1::2] << 3))
    assert np.array_equal(from_pairs(pairs), packed)
    if pairs.size:
        bad = pairs.copy()
        bad[-1] |= 0x40
        with pytest.raises(codecs.CodecError, match="6 bits"):
            from_pairs(bad)
    with pytest.raises(codecs.CodecError):
        from_pairs(np.zeros(3, dtype=np.uint8))


@pytest.mark.parametrize("runs", [1, 2, 3, 7, 8, 9])
def test_code_pairs_across_blocks(runs, monkeypatch):
    # from_pairs works on blocks of 8-byte words (two runs each); a last odd run is padded
    import rdquant.coding as coding

    monkeypatch.setattr(coding, "_PAIR_BLOCK", 2)
    packed = np.random.default_rng(runs).integers(0, 256, 3 * runs, dtype=np.uint8)
    pairs = coding.to_pairs(packed)
    assert np.array_equal(coding.from_pairs(pairs), packed)
    out = np.full(packed.size, 0xAA, dtype=np.uint8)
    assert coding.from_pairs(pairs, out=out) is out and np.array_equal(out, packed)
    with pytest.raises(ValueError, match="wrong size"):
        coding.from_pairs(pairs, out=np.empty(packed.size + 1, dtype=np.uint8))
    bad = pairs.copy()
    bad[pairs.size // 2] |= 0x80  # in a middle block
    with pytest.raises(codecs.CodecError, match="6 bits"):
        coding.from_pairs(bad)


def test_inspect_reports_mapping_entropy_and_measured_decode_speed(packed_artifact, tmp_path):
    coded = recode(packed_artifact, tmp_path / "auto", codec="auto")
    rep = rdquant.inspect(coded, decode_speed=True)
    coded_layers = [l for l in rep.layers if l.codec != "none"]
    assert coded_layers and all(l.decode_mcodes > 0 and l.mapping != "-" and l.entropy_bits is not None for l in coded_layers)
    assert rep.decode_mcodes > 0 and "codes decode at" in rep.table()
    assert "mapping" in rep.table().splitlines()[0]
    plain = rdquant.inspect(packed_artifact, decode_speed=True)
    assert plain.decode_mcodes is None and all(l.decode_mcodes is None for l in plain.layers)


@settings(max_examples=60, deadline=None)
@given(widths=st.lists(st.integers(0, 8), max_size=12), form=st.sampled_from(["random", "sorted", "constant"]),
       seed=st.integers(0, 9999))
def test_codebook_deltas_round_trip(widths, form, seed):
    """Any 8-bit entries (ascending or not, every width 0-8, no codebooks at all) come back exactly."""
    from rdquant.coding import codebook_delta_streams, merge_codebook_deltas

    w = np.array(widths, dtype=np.uint8)
    rng = np.random.default_rng(seed)
    cb = rng.integers(0, 256, int((1 << w.astype(np.int64)).sum())).astype(np.uint8)
    if form != "random":
        sizes = 1 << w.astype(np.int64)
        cb = np.concatenate([np.sort(c) for c in np.split(cb, np.cumsum(sizes)[:-1])]) if w.size else cb
        cb = np.full_like(cb, 7) if form == "constant" else cb
    (stream,) = codebook_delta_streams(cb, w)
    assert np.array_equal(merge_codebook_deltas(stream, [stream.size], w), cb)


def test_codebook_deltas_are_chosen_for_kmeans_like_codebooks_and_check_their_widths():
    """Ascending entries spread like K-means centroids of bell-shaped columns (0 ... 255 on their lo/step
    grid) code smaller as deltas than as bytes; decoding needs, and checks, the layer's widths."""
    from rdquant.coding import decode_tensor, encode_tensors, merge_codebook_deltas

    rng = np.random.default_rng(5)
    in_f = 300
    widths = torch.from_numpy(rng.choice([2, 3, 3, 4], in_f).astype(np.uint8))
    books = []
    for b in widths.tolist():
        c = np.sort(np.sinh(1.5 * np.linspace(-1, 1, 1 << b)) + rng.normal(0, 0.02, 1 << b))
        books.append(np.round((c - c[0]) / (c[-1] - c[0]) * 255))
    codebook = torch.from_numpy(np.concatenate(books).astype(np.uint8))
    layer = {"shape": [64, in_f], "share": 1, "layout": "codebook", "bits": 8, "group_size": 1, "symmetric": False}
    stored = encode_tensors({"l.widths": widths, "l.codebook": codebook}, {"l": layer}, "zstd-19")
    payload, fields = stored["l.codebook"]
    assert fields == {"codec": "zstd-19", "kind": "bytes", "mapping": "codebook-deltas"}
    plain = len(codecs.encode(codebook.numpy(), "zstd-19"))
    assert payload.numel() < 0.8 * plain, (payload.numel(), plain)
    entry = {"codec": fields, "dtype": "uint8", "shape": [codebook.numel()]}
    assert torch.equal(decode_tensor("l.codebook", payload, entry, {"l": layer}, {"l.widths": widths}), codebook)
    with pytest.raises(codecs.CodecError, match="widths"):
        decode_tensor("l.codebook", payload, entry, {"l": layer}, {})
    other = widths.clone()
    other[0] = 5 if int(other[0]) != 5 else 4
    with pytest.raises(codecs.CodecError, match="widths"):
        decode_tensor("l.codebook", payload, entry, {"l": layer}, {"l.widths": other})
    flat, lengths = codecs.read_streams(payload.numpy())
    with pytest.raises(codecs.CodecError, match="above 8 bits"):
        merge_codebook_deltas(flat, lengths, np.full(3, 9, dtype=np.uint8))


@pytest.mark.parametrize("workers", [1, 2, 5])
def test_reader_decodes_a_layer_s_widths_before_what_needs_them(tmp_path, workers):
    """A codebook stored before its widths (codebook-deltas needs them) still reads back exactly, with
    any number of reader threads: a layer's tensors are read in decode order, not file order."""
    from rdquant.artifact import read_tensors, write_artifact
    from rdquant.coding import encode_tensors

    rng = np.random.default_rng(6)
    layer = {"shape": [64, 200], "share": 1, "layout": "codebook", "bits": 8, "group_size": 1, "symmetric": False}
    tensors, quantized = {}, {}
    for i in range(3):
        widths = torch.from_numpy(rng.choice([2, 3, 4], 200).astype(np.uint8))
        books = [np.sort(np.sinh(1.5 * np.linspace(-1, 1, 1 << b))) for b in widths.tolist()]
        books = [np.round((c - c[0]) / (c[-1] - c[0]) * 255) for c in books]
        tensors[f"l{i}.codebook"] = torch.from_numpy(np.concatenate(books).astype(np.uint8))
        tensors[f"l{i}.widths"] = widths
        quantized[f"l{i}"] = layer
    stored = encode_tensors(tensors, quantized, "zstd-19")
    assert all(stored[f"l{i}.codebook"][1].get("mapping") == "codebook-deltas" for i in range(3))
    write_artifact(tmp_path / "a", tensors, {"quantized": quantized}, {}, stored=stored)
    back = read_tensors(tmp_path / "a", workers=workers)[1]
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_an_unknown_mapping_is_a_clear_error():
    from rdquant.coding import decode_tensor

    entry = {"codec": {"codec": "auto", "kind": "bytes", "mapping": "from-the-future"}, "dtype": "uint8", "shape": [4]}
    with pytest.raises(codecs.CodecError, match="unknown mapping 'from-the-future'"):
        decode_tensor("l.x", torch.zeros(4, dtype=torch.uint8), entry, {}, {})
