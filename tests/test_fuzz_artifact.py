"""Damaged artifacts: random and truncated bytes in every file of an artifact (packed and entropy-coded)
give a named ArtifactError / RdquantError from `load`, `load_tokenizer` and `inspect`, never a
traceback, and never a model that differs from the original."""

from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path

import pytest
import torch

import rdquant
from rdquant.artifact import check_sidecars, read_manifest, read_tensors
from rdquant.errors import RdquantError
from rdquant.testing import tiny_model, tiny_tokenizer

# 10,000 cases in all by default (the bar); RDQUANT_FUZZ_CASES changes it
CASES = int(os.environ.get("RDQUANT_FUZZ_CASES", "10000"))
FULL_LOAD_SHARE = 0.1  # the rest check the readers the loader is built from (read_tensors, manifest)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> list[tuple[Path, dict[str, torch.Tensor]]]:
    """A packed and an entropy-coded artifact of a tiny model, with the state each loads to."""
    tok = tiny_tokenizer()
    model = tiny_model("llama", len(tok), hidden=32, intermediate=64, layers=2)
    calib = torch.randint(0, len(tok), (2, 16))
    out = []
    for codec in ("none", "auto"):
        cm = rdquant.compress(model if codec == "none" else tiny_model("llama", len(tok), hidden=32, intermediate=64, layers=2),
                              rdquant.CompressConfig(bits=3, group_size=16), tokenizer=tok, calib_ids=calib, progress=False)
        path = cm.save(tmp_path_factory.mktemp(codec) / "art", codec=codec)
        state = {k: v.clone() for k, v in rdquant.load(path).state_dict().items()}
        out.append((path, state))
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


def _same_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    got = model.state_dict()
    return got.keys() == state.keys() and all(torch.equal(got[k], v) for k, v in state.items())


def test_damaged_artifacts_raise_named_errors_only(artifacts):
    rng = random.Random(1234)
    originals = [(path, {f: f.read_bytes() for f in sorted(path.iterdir())}, state) for path, state in artifacts]
    counts = {"cases": 0, "named errors": 0, "loaded unchanged": 0, "full loads": 0}
    t0 = time.perf_counter()
    for case in range(CASES):
        path, files, state = originals[case % len(originals)]
        victim = rng.choice(sorted(files))
        damaged = _damage(files[victim], rng)
        victim.write_bytes(damaged)
        full = rng.random() < FULL_LOAD_SHARE
        try:
            if full:
                counts["full loads"] += 1
                model = rdquant.load(path)
                assert _same_state(model, state), f"case {case}: {victim.name} damaged, load returned other weights"
                rdquant.load_tokenizer(path)
                rdquant.inspect(path, decode_speed=False)
            else:
                check_sidecars(path, read_manifest(path))  # config, tokenizer, log: what load/inspect check
                _, tensors = read_tensors(path, verify=True)
                for k, v in tensors.items():
                    assert k in state and torch.equal(v.to(state[k].dtype), state[k]), \
                        f"case {case}: {victim.name} damaged, {k} read back different"
            counts["loaded unchanged"] += 1
        except RdquantError:
            counts["named errors"] += 1
        except Exception as e:  # any other exception is a traceback a user would see
            raise AssertionError(f"case {case}: {victim.name} damaged ({len(files[victim])} -> {len(damaged)} bytes) "
                                 f"raised {type(e).__name__}: {e}") from e
        finally:
            victim.write_bytes(files[victim])
        counts["cases"] += 1
    print(f"\n{counts} in {time.perf_counter() - t0:.1f} s")
    assert counts["cases"] == CASES and counts["named errors"] > CASES // 2


def test_tensor_data_damage_is_always_detected(artifacts):
    """A flipped bit anywhere in a tensor's bytes fails load (sha256), for packed and coded artifacts."""
    import json
    import struct

    rng = random.Random(7)
    for path, _ in artifacts:
        shard = path / "model.safetensors"
        data = shard.read_bytes()
        (hlen,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + hlen])
        try:
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                lo, hi = info["data_offsets"]
                if hi == lo:
                    continue
                buf = bytearray(data)
                i = 8 + hlen + rng.randrange(lo, hi)
                buf[i] ^= 1 << rng.randrange(8)
                shard.write_bytes(bytes(buf))
                with pytest.raises(rdquant.ArtifactError, match="sha256|does not decode|corrupted"):
                    rdquant.load(path)
        finally:
            shard.write_bytes(data)
