"""Lossless codecs for quantization symbols and raw tensor bytes (docs/FORMAT.md, "Codecs").

A codec turns a stream of small integer symbols (one per weight, uint8) into bytes and back,
bit-exactly. Three families, all from well-kept libraries:
  - `zstd-L` (zstandard, level L) and `lz4` (lz4.frame): byte-oriented; they see one byte per symbol.
  - `ans`: an asymmetric-numeral-system coder (constriction's stack coder) driven by the symbols'
    own frequency table, which is stored in the payload; within a few bytes of the empirical entropy.
Payloads are self-describing (a small header precedes the body), so a coded tensor is one uint8 blob.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass

import numpy as np

_MAGIC = b"RDQC"
_HEADER = struct.Struct("<4sBBHQ")  # magic, codec id, level, alphabet size, number of symbols

# Codec names and ids; decode speeds (MB/s of one-byte symbols, one thread, this project's 2-core CI
# machine) are measured by bench/codecs.py and used by `auto` so the choice is deterministic.
CODEC_IDS = {"none": 0, "zstd": 1, "lz4": 2, "ans": 3}
NOMINAL_DECODE_MBPS = {"none": 5000.0, "zstd": 900.0, "lz4": 800.0, "ans": 60.0}
AUTO_CANDIDATES = ("zstd-3", "zstd-19", "lz4", "ans")


class CodecError(ValueError):
    """A payload that does not decode: wrong magic, truncated, or internally inconsistent."""


@dataclass(frozen=True)
class CodecSpec:
    name: str  # none | zstd | lz4 | ans
    level: int = 0

    @classmethod
    def parse(cls, text: str) -> "CodecSpec":
        name, _, level = text.partition("-")
        if name not in CODEC_IDS or (level and name != "zstd"):
            raise ValueError(f"unknown codec {text!r}; use none, zstd-LEVEL (1-22), lz4, ans or auto")
        lvl = int(level) if level else (3 if name == "zstd" else 0)
        if name == "zstd" and not 1 <= lvl <= 22:
            raise ValueError("zstd level must be in 1..22")
        return cls(name, lvl)

    def __str__(self) -> str:
        return f"zstd-{self.level}" if self.name == "zstd" else self.name


def entropy_bits(symbols: np.ndarray) -> float:
    """Empirical (order-0) entropy of the stream in bits per symbol: the floor for i.i.d. coding."""
    if symbols.size == 0:
        return 0.0
    counts = np.bincount(symbols.reshape(-1))
    p = counts[counts > 0] / symbols.size
    return float(-(p * np.log2(p)).sum())


def encode(symbols: np.ndarray, codec: CodecSpec | str) -> bytes:
    """Payload bytes for a uint8 symbol stream."""
    spec = CodecSpec.parse(codec) if isinstance(codec, str) else codec
    sym = np.ascontiguousarray(symbols, dtype=np.uint8).reshape(-1)
    alphabet = int(sym.max()) + 1 if sym.size else 1
    header = _HEADER.pack(_MAGIC, CODEC_IDS[spec.name], spec.level, alphabet, sym.size)
    if spec.name == "none":
        body = sym.tobytes()
    elif spec.name == "zstd":
        import zstandard

        body = zstandard.ZstdCompressor(level=spec.level).compress(sym.tobytes())
    elif spec.name == "lz4":
        import lz4.frame

        body = lz4.frame.compress(sym.tobytes(), compression_level=0)
    else:
        body = _ans_encode(sym, alphabet)
    return header + body


def _bytes_of(payload: bytes | np.ndarray) -> memoryview:
    """A payload (bytes-like or uint8 array) as a flat byte view, without copying."""
    return memoryview(payload.reshape(-1)) if isinstance(payload, np.ndarray) else memoryview(payload).cast("B")


def decode(payload: bytes | np.ndarray) -> np.ndarray:
    """The uint8 symbol stream of a payload (raises CodecError on a malformed one)."""
    buf = _bytes_of(payload)
    if len(buf) < _HEADER.size:
        raise CodecError("payload shorter than its header")
    magic, cid, level, alphabet, n = _HEADER.unpack(buf[: _HEADER.size])
    if magic != _MAGIC:
        raise CodecError("payload has no codec header")
    body = buf[_HEADER.size :]
    try:
        if cid == CODEC_IDS["none"]:
            out = np.frombuffer(body, dtype=np.uint8).copy()
        elif cid == CODEC_IDS["zstd"]:
            out = np.frombuffer(_zstd_decompressor().decompress(body, max_output_size=n), dtype=np.uint8)
        elif cid == CODEC_IDS["lz4"]:
            import lz4.frame

            out = np.frombuffer(lz4.frame.decompress(body), dtype=np.uint8)
        elif cid == CODEC_IDS["ans"]:
            out = _ans_decode(body, alphabet, n)
        else:
            raise CodecError(f"unknown codec id {cid}")
    except CodecError:
        raise
    except Exception as e:  # the libraries' own errors on damaged input
        raise CodecError(f"payload does not decode ({e})") from e
    if out.size != n:
        raise CodecError(f"payload decodes to {out.size} symbols, header says {n}")
    return out


_LOCAL = threading.local()


def _zstd_decompressor():
    """One zstd decompression context per thread (making one per payload costs more than decoding a
    small stream)."""
    d = getattr(_LOCAL, "zstd", None)
    if d is None:
        import zstandard

        d = _LOCAL.zstd = zstandard.ZstdDecompressor()
    return d


# --- ANS via constriction ------------------------------------------------------------------------
_FREQ_DTYPE = np.uint32


def _ans_model(counts: np.ndarray):
    import constriction

    probs = counts.astype(np.float64) / counts.sum()
    return constriction.stream.model.Categorical(probs.astype(np.float32), perfect=False)


def _ans_encode(sym: np.ndarray, alphabet: int) -> bytes:
    import constriction

    counts = np.bincount(sym, minlength=alphabet).astype(_FREQ_DTYPE)
    if np.count_nonzero(counts) <= 1:  # zero or one distinct symbol: the table says it all
        return counts.tobytes()
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(sym.astype(np.int32), _ans_model(counts))
    return counts.tobytes() + coder.get_compressed().tobytes()


def _ans_decode(body: memoryview, alphabet: int, n: int) -> np.ndarray:
    import constriction

    table = alphabet * np.dtype(_FREQ_DTYPE).itemsize
    if len(body) < table:
        raise CodecError("ANS payload shorter than its frequency table")
    counts = np.frombuffer(body[:table], dtype=_FREQ_DTYPE)
    if int(counts.sum()) != n:
        raise CodecError("ANS frequency table does not match the symbol count")
    if np.count_nonzero(counts) <= 1:
        if len(body) != table:
            raise CodecError("ANS payload has trailing bytes")
        return np.full(n, int(np.argmax(counts)) if n else 0, dtype=np.uint8)
    words = np.frombuffer(body[table:], dtype=np.uint32)
    coder = constriction.stream.stack.AnsCoder(words.copy())
    out = coder.decode(_ans_model(counts), n).astype(np.uint8)
    if not coder.is_empty():  # an intact stream is consumed exactly
        raise CodecError("ANS payload is damaged (bits left over after decoding)")
    return out


# --- several streams in one payload (context modelling: one stream, one frequency table per context) --
_STREAMS = struct.Struct("<4sI")  # magic, number of streams; then uint64 payload lengths, then the payloads
_STREAMS_MAGIC = b"RDQS"


def pack_streams(payloads: list[bytes]) -> bytes:
    """One blob holding several self-describing payloads (each from `encode`)."""
    lengths = np.array([len(b) for b in payloads], dtype="<u8").tobytes()
    return _STREAMS.pack(_STREAMS_MAGIC, len(payloads)) + lengths + b"".join(payloads)


def unpack_streams(payload: bytes | np.ndarray) -> list[np.ndarray]:
    """The decoded symbol streams of a `pack_streams` blob, in order."""
    buf = _bytes_of(payload)
    if len(buf) < _STREAMS.size:
        raise CodecError("multi-stream payload shorter than its header")
    magic, n = _STREAMS.unpack(buf[: _STREAMS.size])
    pos = _STREAMS.size + 8 * n
    if magic != _STREAMS_MAGIC or len(buf) < pos:
        raise CodecError("not a multi-stream payload")
    lengths = np.frombuffer(buf[_STREAMS.size : pos], dtype="<u8").astype(np.int64)
    if pos + int(lengths.sum()) != len(buf):
        raise CodecError("multi-stream payload has the wrong length")
    out = []
    for length in lengths.tolist():
        out.append(decode(np.frombuffer(buf[pos : pos + length], dtype=np.uint8)))
        pos += length
    return out


# --- zstd streams back to back: one C call decodes them all into one buffer ---------------------------
_ZSTREAMS_MAGIC = b"RDQZ"  # then uint32 stream count n, n uint64 decoded lengths, n uint64 frame lengths, the frames


def pack_zstd_streams(frames: list[bytes], sizes: list[int]) -> bytes:
    """Several zstd frames (each its own Huffman tables: one stream per context) in one blob whose
    decoder reads across the frames into one buffer (no per-stream Python work)."""
    lengths = np.array([*sizes, *(len(f) for f in frames)], dtype="<u8").tobytes()
    return _STREAMS.pack(_ZSTREAMS_MAGIC, len(frames)) + lengths + b"".join(frames)


def encode_streams(streams: list[np.ndarray], codec: str, speed_floor_mbps: float, choose) -> bytes:
    """One payload for several streams: back-to-back zstd frames when the codec is zstd or `auto` (each
    stream at its smaller zstd level; zstd stores an incompressible stream raw), else `pack_streams`.
    `choose(data, codec, floor) -> (spec, payload)` is coding.choose_codec."""
    if codec == "auto":  # the zstd levels auto may use (none if the floor excludes zstd)
        levels = [c for c in AUTO_CANDIDATES if c.startswith("zstd")] if NOMINAL_DECODE_MBPS["zstd"] >= speed_floor_mbps else []
    else:
        levels = [codec] if codec.startswith("zstd") else []
    if not levels:  # each stream in its own payload; one that the codec would expand (a frequency table
        # costs more than a short stream saves) is stored raw: every payload names its own codec
        return pack_streams([min(choose(seg, codec, speed_floor_mbps)[1], encode(seg, "none"), key=len) for seg in streams])
    frames = [min((encode(seg, c) for c in levels), key=len)[_HEADER.size:] for seg in streams]
    return pack_zstd_streams(frames, [s.size for s in streams])


def scratch(key: str, nbytes: int) -> np.ndarray:
    """This thread's reusable uint8 buffer `key`, at least nbytes long (a view of that length): for
    intermediate decoding results that do not leave the call. A reused buffer is already mapped and
    often still in cache; a fresh one costs a page fault per 4 KB."""
    bufs = getattr(_LOCAL, "scratch", None)
    if bufs is None:
        bufs = _LOCAL.scratch = {}
    buf = bufs.get(key)
    if buf is None or buf.size < nbytes:
        buf = bufs[key] = np.empty(nbytes, dtype=np.uint8)
    return buf[:nbytes]


def release_scratch() -> None:
    """Free this thread's scratch buffers (a reader calls it when it is done)."""
    _LOCAL.scratch = {}


def read_streams(payload: bytes | np.ndarray, reuse: bool = False) -> tuple[np.ndarray, list[int]]:
    """(all decoded streams concatenated, each stream's length) of a multi-stream payload of either
    form (`pack_zstd_streams` or `pack_streams`). With `reuse` zstd streams are decoded into this
    thread's scratch buffer: the result is valid until the thread's next such call."""
    buf = _bytes_of(payload)
    if len(buf) < _STREAMS.size:
        raise CodecError("multi-stream payload shorter than its header")
    magic, n = _STREAMS.unpack(buf[: _STREAMS.size])
    if magic != _ZSTREAMS_MAGIC:
        streams = unpack_streams(payload)
        return (np.concatenate(streams) if streams else np.zeros(0, dtype=np.uint8)), [s.size for s in streams]
    pos = _STREAMS.size + 16 * n
    if len(buf) < pos:
        raise CodecError("multi-stream payload shorter than its header")
    sizes, frames = np.frombuffer(buf[_STREAMS.size : pos], dtype="<u8").astype(np.int64).reshape(2, n)
    if pos + int(frames.sum()) != len(buf):
        raise CodecError("multi-stream payload has the wrong length")
    total = int(sizes.sum())
    out = scratch("streams", total) if reuse else np.empty(total, dtype=np.uint8)
    try:
        reader = _zstd_decompressor().stream_reader(buf[pos:], read_across_frames=True, closefd=False)
        got = 0
        while got < total:
            k = reader.readinto(memoryview(out)[got:])
            if not k:
                break
            got += k
        extra = reader.read(1)
    except Exception as e:  # zstd's own errors on damaged input
        raise CodecError(f"payload does not decode ({e})") from e
    if got != total or extra:
        raise CodecError(f"zstd streams decode to {got}{'+' if extra else ''} bytes, header says {total}")
    return out, sizes.tolist()
