import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rdquant import codecs

CODECS = ["none", "zstd-3", "zstd-19", "lz4", "ans"]


@pytest.mark.parametrize("codec", CODECS)
@settings(max_examples=25, deadline=None)
@given(data=st.lists(st.integers(0, 255), max_size=3000))
def test_round_trip_random(codec, data):
    sym = np.array(data, dtype=np.uint8)
    assert np.array_equal(codecs.decode(codecs.encode(sym, codec)), sym)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize(
    "sym",
    [
        np.zeros(0, dtype=np.uint8),  # empty
        np.full(10_000, 7, dtype=np.uint8),  # one symbol
        np.arange(256, dtype=np.uint8),  # all symbols distinct
        np.random.default_rng(0).integers(0, 256, 50_000).astype(np.uint8),  # incompressible
    ],
    ids=["empty", "constant", "all-distinct", "uniform"],
)
def test_round_trip_edge_cases(codec, sym):
    assert np.array_equal(codecs.decode(codecs.encode(sym, codec)), sym)


def test_ans_reaches_the_entropy():
    rng = np.random.default_rng(1)
    sym = np.clip(np.round(rng.normal(3.5, 1.2, 200_000)), 0, 7).astype(np.uint8)
    bits = 8 * (len(codecs.encode(sym, "ans")) - codecs._HEADER.size - 8 * 4) / sym.size
    assert bits == pytest.approx(codecs.entropy_bits(sym), abs=0.01)


@pytest.mark.parametrize("codec", ["zstd-3", "lz4", "ans"])
def test_damaged_payload_raises(codec):
    sym = np.random.default_rng(2).integers(0, 8, 5000).astype(np.uint8)
    payload = codecs.encode(sym, codec)
    with pytest.raises(codecs.CodecError):
        codecs.decode(payload[: len(payload) // 2])
    with pytest.raises(codecs.CodecError):
        codecs.decode(b"XXXX" + payload[4:])


def test_codec_names():
    assert str(codecs.CodecSpec.parse("zstd")) == "zstd-3"
    with pytest.raises(ValueError):
        codecs.CodecSpec.parse("brotli")
    with pytest.raises(ValueError):
        codecs.CodecSpec.parse("zstd-99")


@pytest.mark.parametrize("codec", ["zstd-3", "zstd-19", "auto", "lz4", "ans"])
@settings(max_examples=20, deadline=None)
@given(streams=st.lists(st.binary(max_size=400), max_size=5))
def test_multi_stream_payloads_round_trip_and_reject_truncation(codec, streams):
    """zstd / auto: frames back to back, decoded in one pass; other codecs: self-describing payloads."""
    from rdquant.coding import choose_codec

    segs = [np.frombuffer(b, dtype=np.uint8) for b in streams]
    blob = codecs.encode_streams(segs, codec, 200.0, choose_codec)
    assert blob[:4] == (b"RDQZ" if codec != "lz4" and codec != "ans" else b"RDQS")
    flat, lengths = codecs.read_streams(blob)
    assert lengths == [s.size for s in segs] and flat.tobytes() == b"".join(streams)
    if codec in ("lz4", "ans"):  # no stream costs more than its raw payload
        header = codecs._STREAMS.size + 8 * len(segs)
        assert len(blob) <= header + sum(len(codecs.encode(x, "none")) for x in segs)
    with pytest.raises(codecs.CodecError):
        codecs.read_streams(blob[:-1])
    reused, _ = codecs.read_streams(blob, reuse=True)  # zstd into this thread's scratch buffer
    assert reused.tobytes() == b"".join(streams)


def test_scratch_buffers_are_per_thread_and_reused():
    import threading

    a = codecs.scratch("t", 100)
    assert codecs.scratch("t", 50).base is a.base  # smaller requests reuse the buffer
    assert codecs.scratch("t", 200).size == 200
    other = []
    t = threading.Thread(target=lambda: other.append(codecs.scratch("t", 100)))
    t.start()
    t.join()
    assert other[0].base is not a.base
    codecs.release_scratch()
    assert codecs.scratch("t", 100).base is not a.base


def test_short_streams_that_ans_would_expand_are_stored_raw():
    """ANS pays a 256-entry count table per stream: short streams (byte planes of a small segment) are
    stored raw inside the multi-stream payload, long ones coded, and the blob decodes to both."""
    from rdquant.coding import choose_codec

    rng = np.random.default_rng(0)
    short = rng.integers(0, 256, 300).astype(np.uint8)
    long = np.minimum(rng.geometric(0.3, 200_000), 255).astype(np.uint8)
    blob = codecs.encode_streams([short, long], "ans", 200.0, choose_codec)
    parts = codecs.unpack_streams(blob)
    assert [p.tobytes() for p in parts] == [short.tobytes(), long.tobytes()]
    assert len(codecs.encode(short, "ans")) > len(codecs.encode(short, "none"))  # ANS would expand it
    expected = codecs._STREAMS.size + 16 + len(codecs.encode(short, "none")) + len(codecs.encode(long, "ans"))
    assert len(blob) == expected
