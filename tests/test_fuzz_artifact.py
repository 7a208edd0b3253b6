"""Damaged artifacts: random and truncated bytes in every file of an artifact (packed and entropy-coded,
affine, codebook and mixed layouts), and manifests of valid JSON with wrong values, give a named
ArtifactError / RdquantError from `load`, `load_tokenizer` and `inspect`, never a traceback, and never a
model that differs from the original."""

from __future__ import annotations

import json
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import rdquant
from rdquant.artifact import MANIFEST, check_sidecars, read_manifest, read_tensors
from rdquant.errors import RdquantError
from rdquant.testing import tiny_model, tiny_tokenizer

# 10,000 byte-damage cases by default (the bar) and a twentieth of that of manifest-value cases;
# RDQUANT_FUZZ_CASES changes both
CASES = int(os.environ.get("RDQUANT_FUZZ_CASES", "10000"))
FULL_LOAD_SHARE = 0.1  # the rest check the readers the loader is built from (read_tensors, manifest)
MANIFEST_CASES = max(1, CASES // 20)
PROMPT = torch.tensor([[1, 2, 3, 4, 5]])


@dataclass
class Artifact:
    path: Path
    state: dict[str, torch.Tensor]  # what load gives
    logits: torch.Tensor  # of PROMPT
    # affine layers' buffers are sized by the manifest, so a manifest (without its checksum) that does not
    # fit the data fails in load; codebook and mixed layers are sized by their data and fail at first use,
    # with an error that is not an ArtifactError yet (test_resizable_layer_whose_manifest_does_not_fit_...)
    mismatch_fails_in_load: bool


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> list[Artifact]:
    """Artifacts of one tiny model: affine packed and coded, codebook (claq) and mixed (cvxq) coded."""
    tok = tiny_tokenizer()
    calib = torch.randint(0, len(tok), (2, 16), generator=torch.Generator().manual_seed(0))
    out = []
    for name, cfg, codec in [("affine-packed", dict(bits=3, group_size=16), "none"),
                             ("affine-coded", dict(bits=3, group_size=16), "auto"),
                             ("codebook-coded", dict(method="claq", bits=3), "auto"),
                             ("mixed-coded", dict(method="cvxq", target_bits=3.2), "auto")]:
        model = tiny_model("llama", len(tok), hidden=32, intermediate=64, layers=2)
        cm = rdquant.compress(model, rdquant.CompressConfig(**cfg), tokenizer=tok, calib_ids=calib, progress=False)
        path = cm.save(tmp_path_factory.mktemp(name) / "art", codec=codec)
        loaded = rdquant.load(path)
        with torch.no_grad():
            logits = loaded(PROMPT).logits
        state = {k: v.clone() for k, v in loaded.state_dict().items()}
        out.append(Artifact(path, state, logits, mismatch_fails_in_load=name.startswith("affine")))
    return out


def _damage(data: bytes, rng: random.Random) -> bytes:
    kind = rng.randrange(5)
    if kind == 0 or not data:  # truncated
        return data[: rng.randrange(len(data) + 1)]
    if kind == 1:  # replaced by random bytes
        return rng.randbytes(rng.randrange(1, 2 * len(data) + 2))
    buf = bytearray(data)
    if kind == 2:  # a few flipped bits
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
    elif kind == 3:  # a run overwritten
        i = rng.randrange(len(buf))
        n = rng.randint(1, 64)
        buf[i : i + n] = rng.randbytes(min(n, len(buf) - i))
    else:  # bytes appended
        buf += rng.randbytes(rng.randint(1, 64))
    return bytes(buf)


def _check_loaded(model: torch.nn.Module, art: Artifact, where: str) -> None:
    """A model that loads from a damaged artifact must be the original: same tensors, same outputs."""
    got = model.state_dict()
    assert got.keys() == art.state.keys() and all(torch.equal(got[k], v) for k, v in art.state.items()), \
        f"{where}: load returned other weights"
    with torch.no_grad():
        assert torch.equal(model(PROMPT).logits, art.logits), f"{where}: the loaded model computes other outputs"


def test_damaged_artifacts_raise_named_errors_only(artifacts):
    rng = random.Random(1234)
    originals = [(art, {f: f.read_bytes() for f in sorted(art.path.iterdir())}) for art in artifacts]
    counts = {"cases": 0, "named errors": 0, "loaded unchanged": 0, "full loads": 0}
    t0 = time.perf_counter()
    for case in range(CASES):
        art, files = originals[case % len(originals)]
        victim = rng.choice(sorted(files))
        damaged = _damage(files[victim], rng)
        victim.write_bytes(damaged)
        where = f"case {case}: {victim.parent.parent.name}/{victim.name} damaged ({len(files[victim])} -> {len(damaged)} bytes)"
        full = rng.random() < FULL_LOAD_SHARE
        try:
            if full:
                counts["full loads"] += 1
                _check_loaded(rdquant.load(art.path), art, where)
                rdquant.load_tokenizer(art.path)
                rdquant.inspect(art.path, decode_speed=False).table()
            else:
                check_sidecars(art.path, read_manifest(art.path))  # config, tokenizer, log: what load/inspect check
                _, tensors = read_tensors(art.path, verify=True)
                for k, v in tensors.items():
                    assert k in art.state and torch.equal(v.to(art.state[k].dtype), art.state[k]), \
                        f"{where}: {k} read back different"
            counts["loaded unchanged"] += 1
        except RdquantError:
            counts["named errors"] += 1
        except Exception as e:  # any other exception is a traceback a user would see
            raise AssertionError(f"{where}: raised {type(e).__name__}: {e}") from e
        finally:
            victim.write_bytes(files[victim])
        counts["cases"] += 1
    dt = time.perf_counter() - t0
    print(f"\n{counts} in {dt:.1f} s ({counts['cases'] / dt:,.0f} cases/s)")
    assert counts["cases"] == CASES and counts["named errors"] > CASES // 2


def _json_paths(obj, prefix: tuple = ()) -> list[tuple]:
    """Every place in a JSON document: the keys / indices that lead to it."""
    paths = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            paths += _json_paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            paths += _json_paths(v, prefix + (i,))
    return paths


_DELETE = object()


def _wrong_value(value, rng: random.Random):
    """Another value for a manifest field: of another type, out of range, or near the right one."""
    if isinstance(value, bool):
        near = [not value]
    elif isinstance(value, int):
        near = [value + 1, value - 1, value * 2, value // 2, -value, 0, -1]
    elif isinstance(value, str):
        i = rng.randrange(max(len(value), 1))
        near = [value[:i] + chr(rng.randrange(32, 127)) + value[i + 1:], value[:i], ""]
    elif isinstance(value, list):
        near = [value[:-1], value + value[-1:], value[::-1]]
    else:
        near = [{}]
    other = [_DELETE, None, "x", -1, 0, 10**12, 1.5, True, [], {}, [1, 2], {"a": 1}]
    return rng.choice(near + other)


def test_manifests_with_wrong_values_raise_named_errors_only(artifacts):
    """Valid JSON with a wrong value anywhere (what a flipped digit gives): a named error or the original
    model. Every other case drops the manifest's own checksum (as older rdquant wrote it), so that the
    structure checks behind it are reached; such a manifest may then load as another model (a group size
    16 -> 17 keeps every tensor's shape), but never raise anything but a named error."""
    rng = random.Random(99)
    docs = [(art, (art.path / MANIFEST).read_text()) for art in artifacts]
    counts = {"cases": 0, "named errors": 0, "loaded unchanged": 0, "loaded (no checksum)": 0}
    t0 = time.perf_counter()
    for case in range(MANIFEST_CASES):
        art, text = docs[case % len(docs)]
        manifest = json.loads(text)
        legacy = case % 2 == 1
        if legacy:
            del manifest["manifest_sha256"]
        path = rng.choice(_json_paths(manifest))
        parent = manifest
        for k in path[:-1]:
            parent = parent[k]
        new = _wrong_value(parent[path[-1]], rng)
        if new is _DELETE:
            del parent[path[-1]]
        else:
            parent[path[-1]] = new
        (art.path / MANIFEST).write_text(json.dumps(manifest))
        where = (f"case {case}: {art.path.parent.name} manifest{' without checksum' if legacy else ''} "
                 f"{'/'.join(map(str, path))} = {'deleted' if new is _DELETE else repr(new)}")
        try:
            model = rdquant.load(art.path)
            if not legacy or art.mismatch_fails_in_load:
                lazy = rdquant.load(art.path, lazy=True)  # each layer read and checked at first use
                with torch.no_grad():
                    outputs = [model(PROMPT).logits, lazy(PROMPT).logits]
            rdquant.inspect(art.path, verify=False).table()
            if case % 4 == 0:
                rdquant.load_tokenizer(art.path)
            if legacy:
                counts["loaded (no checksum)"] += 1
            else:
                _check_loaded(model, art, where)
                assert all(torch.equal(o, art.logits) for o in outputs), f"{where}: the lazy model computes other outputs"
                counts["loaded unchanged"] += 1
        except RdquantError:
            counts["named errors"] += 1
        except Exception as e:
            raise AssertionError(f"{where}: raised {type(e).__name__}: {e}") from e
        finally:
            (art.path / MANIFEST).write_text(text)
        counts["cases"] += 1
    dt = time.perf_counter() - t0
    print(f"\n{counts} in {dt:.1f} s ({counts['cases'] / dt:,.0f} cases/s)")
    assert counts["cases"] == MANIFEST_CASES and counts["named errors"] > MANIFEST_CASES // 4


def test_resizable_layer_whose_manifest_does_not_fit_fails_as_artifact_error(artifacts):
    art = next(a for a in artifacts if not a.mismatch_fails_in_load)
    text = (art.path / MANIFEST).read_text()
    manifest = json.loads(text)
    del manifest["manifest_sha256"]  # as older rdquant wrote it: nothing catches the changed value before use
    layer = next(v for v in manifest["quantized"].values() if v.get("layout", "affine") != "affine")
    layer["group_size"] = layer["group_size"] + 1  # a flipped digit: valid JSON and a valid value, wrong for the data
    (art.path / MANIFEST).write_text(json.dumps(manifest))
    try:
        model = rdquant.load(art.path)
        with pytest.raises(rdquant.ArtifactError):
            model(PROMPT)
    finally:
        (art.path / MANIFEST).write_text(text)


def test_tensor_data_damage_is_always_detected(artifacts):
    """A flipped bit anywhere in a tensor's bytes, for every layout, packed and coded: inspect finds it
    (sha256 of each tensor and of each coded payload); load finds it too, except in the few bits of a
    coded payload that decode to the same tensor (a zstd header's window size, a stream's padding),
    where it returns the original model."""
    import struct

    rng = random.Random(7)
    same = 0
    for art in artifacts:
        shard = art.path / "model.safetensors"
        entries = json.loads((art.path / MANIFEST).read_text())["tensors"]
        data = shard.read_bytes()
        (hlen,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + hlen])
        try:
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                lo, hi = info["data_offsets"]
                for _ in range(min(hi - lo, 2)):  # two bits of every tensor
                    buf = bytearray(data)
                    i = 8 + hlen + rng.randrange(lo, hi)
                    buf[i] ^= 1 << rng.randrange(8)
                    shard.write_bytes(bytes(buf))
                    where = f"{art.path.parent.name}: bit flipped in {name} at byte {i - 8 - hlen - lo}"
                    with pytest.raises(rdquant.ArtifactError, match="sha256|does not decode|corrupted"):
                        rdquant.inspect(art.path)
                    try:
                        model = rdquant.load(art.path)
                    except rdquant.ArtifactError as e:
                        assert re.search("sha256|does not decode|corrupted", str(e)), f"{where}: {e}"
                    else:
                        assert "codec" in entries[name], f"{where}: load did not notice"
                        _check_loaded(model, art, where)
                        same += 1
        finally:
            shard.write_bytes(data)
    print(f"\n{same} flips in coded payloads decoded to the original tensors")
