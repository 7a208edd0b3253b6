"""The artifact container (docs/FORMAT.md): safetensors shards + manifest.json with a sha256 per
tensor, plus the model's config and tokenizer files so it loads stand-alone. Writes are atomic."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .adapters import check_spec as check_lowrank
from .errors import ArtifactError, RdquantError
from .safety import check_output, remove_owned

FORMAT_NAME = "rdquant"
FORMAT_VERSION = 8  # 2: optional per-tensor codecs; 3: codebook layers; 4: mixed-width layers; 5: 2:4 sparse, adapters; 6: quantized KV cache; 7: k-quant layers; 8: unstructured 50% sparse layers
READABLE_VERSIONS = (1, 2, 3, 4, 5, 6, 7, 8)


def format_version(quantized: dict[str, Any], kv_cache: bool = False) -> int:
    """The oldest version that holds these layers: 8 with unstructured sparse layers, 7 with k-quant layers, 6 with a quantized KV cache, 5 with 2:4 sparse layers or
    low-rank adapters (which older readers would not apply), else 4, so other artifacts still load in older
    readers."""
    if any(isinstance(q, dict) and q.get("layout") == "sparse50" for q in quantized.values()):
        return 8
    if any(isinstance(q, dict) and q.get("layout") == "kquant" for q in quantized.values()):
        return 7
    if kv_cache:
        return 6
    new = any(isinstance(q, dict) and (q.get("layout") == "sparse24" or "lowrank" in q) for q in quantized.values())
    return 5 if new else 4
MANIFEST = "manifest.json"
SHARD_BYTES = 2 * 1024**3


def tensor_sha256(t: torch.Tensor) -> str:
    data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(memoryview(data)).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_sidecars(path: str | os.PathLike, manifest: dict[str, Any], names: list[str] | None = None) -> int:
    """Check the sha256 of the artifact's other files (config, tokenizer, log) that the manifest lists
    (artifacts written before the list existed have none); `names`: only these. Returns how many."""
    p = Path(path)
    listed = manifest.get("sidecar_sha256") or {}
    checked = 0
    for fname, sha in listed.items():
        if names is not None and fname not in names:
            continue
        f = p / fname
        if not f.is_file():
            raise ArtifactError(f"{f} is missing")
        if file_sha256(f) != sha:
            raise ArtifactError(f"{f} fails its sha256 check: the artifact is corrupted")
        checked += 1
    return checked


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _size_of(tensors: Mapping[str, torch.Tensor], name: str) -> int:
    """A tensor's bytes; a lazily read mapping (a streamed run's block files) tells without reading it."""
    size = getattr(tensors, "nbytes_of", None)
    return size(name) if size is not None else tensors[name].nbytes


def write_artifact(
    out: Path,
    tensors: Mapping[str, torch.Tensor],
    manifest: dict[str, Any],
    extra_files: dict[str, Any],
    overwrite: bool = False,
    stored: dict[str, tuple[torch.Tensor, dict[str, Any]]] | None = None,
) -> None:
    """Write tensors (sharded safetensors) + manifest + extra files into a temporary directory beside
    `out`, then rename it into place, so `out` is never half-written.

    extra_files maps a file name to a callable(dir) that writes it (config, tokenizer, logs).
    `tensors` may be a lazily read mapping: one shard at a time is in memory.
    `stored` holds coded payloads (coding.encode_tensors) written instead of the named tensors; the
    manifest keeps the decoded tensor's dtype, shape and sha256 and adds the payload's.
    """
    stored = stored or {}
    out = Path(out)
    check_output(out, overwrite)  # only an rdquant artifact (or an empty directory) is ever replaced
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RdquantError(f"cannot create {out.parent}: {e.strerror}; choose another --out") from e
    need = sum(stored[n][0].nbytes if n in stored else _size_of(tensors, n) for n in tensors) + 64 * 2**20
    free = shutil.disk_usage(out.parent).free
    if free < need:
        raise RdquantError(f"not enough disk space for {out}: it needs about {need / 2**20:,.0f} MiB, "
                           f"{out.parent} has {free / 2**20:,.0f} MiB free; free space or choose another --out")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)  # our own temporary directory, left by a killed run of this process id
    try:
        tmp.mkdir()
    except OSError as e:
        raise RdquantError(f"cannot write in {out.parent}: {e.strerror}; choose another --out") from e
    try:
        plan: list[list[str]] = [[]]  # shard assignment from sizes alone, then one shard in memory at a time
        size, owner = 0, None
        for name in tensors:
            nbytes = stored[name][0].nbytes if name in stored else _size_of(tensors, name)
            new_owner = name.rpartition(".")[0]  # a layer's tensors stay in one shard
            if plan[-1] and size + nbytes > SHARD_BYTES and new_owner != owner:
                plan.append([])
                size = 0
            plan[-1].append(name)
            size += nbytes
            owner = new_owner
        entries: dict[str, Any] = {}
        files: dict[str, Any] = {}
        for k, names in enumerate(plan):
            fname = "model.safetensors" if len(plan) == 1 else f"model-{k + 1:05d}-of-{len(plan):05d}.safetensors"
            shard = {n: (stored[n][0] if n in stored else tensors[n]).detach().contiguous().cpu() for n in names}
            save_file(shard, tmp / fname, metadata={"format": "pt", "producer": FORMAT_NAME})
            files[fname] = {"bytes": (tmp / fname).stat().st_size}
            for name, t in shard.items():
                decoded = tensors[name] if name in stored else t
                entries[name] = {
                    "file": fname,
                    "dtype": _dtype_name(decoded),
                    "shape": list(decoded.shape),
                    "sha256": tensor_sha256(decoded),
                }
                if name in stored:
                    entries[name]["codec"] = stored[name][1]
                    entries[name]["stored_bytes"] = t.numel()
                    entries[name]["stored_sha256"] = tensor_sha256(t)
            del shard
        for writer in extra_files.values():
            writer(tmp)
        sidecars = {f.name: file_sha256(f) for f in sorted(tmp.iterdir()) if f.is_file() and f.name not in files}
        manifest = {"format": FORMAT_NAME, "format_version": format_version(manifest.get("quantized", {}), "kv_cache" in manifest),
                    **{k: v for k, v in manifest.items() if k != "manifest_sha256"}, "files": files, "tensors": entries,
                    "sidecar_sha256": sidecars}
        manifest = json.loads(json.dumps(manifest))  # as a reader will see it (lists for tuples, str keys)
        manifest["manifest_sha256"] = manifest_sha256(manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if out.exists():
            check_output(out, overwrite)  # still ours: checked again right before it is replaced
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            remove_owned(old)  # an old artifact a killed run of this process id left (refused if not ours)
            out.rename(old)
            try:
                tmp.rename(out)
            except OSError:
                old.rename(out)  # the previous artifact goes back where it was
                raise
            remove_owned(old)
        else:
            tmp.rename(out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise RdquantError(f"the disk filled up while writing {out} (nothing was kept); it needs about "
                               f"{need / 2**20:,.0f} MiB: free space or choose another --out") from e
        raise RdquantError(f"writing {out} failed ({e.strerror or e}); nothing was kept: check the directory's "
                           "permissions and free space") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def manifest_sha256(manifest: dict[str, Any]) -> str:
    """sha256 of a manifest without its own `manifest_sha256`, as JSON with sorted keys, no spaces, ASCII:
    a changed value in the layer table (a group size, a shape) would otherwise load as a different model."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("ascii")).hexdigest()


def is_artifact(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_dir():
        raise ArtifactError(f"artifact not found: {p}")
    mpath = p / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{p} is not an rdquant artifact (no {MANIFEST})")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ArtifactError(f"{mpath} is corrupted ({type(e).__name__}): the artifact is damaged") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{mpath} is not an rdquant manifest")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise ArtifactError(
            f"{p} has format version {manifest.get('format_version')!r}; this rdquant reads version {FORMAT_VERSION}"
        )
    if "manifest_sha256" in manifest and manifest_sha256(manifest) != manifest["manifest_sha256"]:  # absent: older writers
        raise ArtifactError(f"{mpath} fails its sha256 check: the artifact is corrupted")
    _check_manifest(manifest, mpath)
    manifest.setdefault("quantized", {})  # optional: an artifact may quantize nothing / tie nothing
    manifest.setdefault("tied", {})
    return manifest


DTYPE_BYTES = {"uint8": 1, "int8": 1, "int16": 2, "int32": 4, "int64": 8, "float16": 2, "bfloat16": 2, "float32": 4,
               "float64": 8, "bool": 1}  # every dtype a manifest may name, and its size


def entry_nbytes(e: dict[str, Any]) -> int:
    """A manifest tensor entry's decoded bytes (its dtype and shape)."""
    n = DTYPE_BYTES[e["dtype"]]
    for d in e["shape"]:
        n *= d
    return n


def stored_nbytes(e: dict[str, Any]) -> int:
    """A manifest tensor entry's bytes in the file (its coded payload's, where coded)."""
    return int(e.get("stored_bytes", entry_nbytes(e)))


def _check_manifest(m: dict[str, Any], mpath: Path) -> None:
    """The manifest's structure, as far as the readers use it: a damaged one is an ArtifactError here,
    never a KeyError or TypeError later."""
    def bad(what: str) -> ArtifactError:
        return ArtifactError(f"{mpath} is damaged: {what}")

    def is_int(x: Any, lo: int = 0) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= lo

    files, tensors = m.get("files"), m.get("tensors")
    quantized, tied = m.get("quantized", {}), m.get("tied", {})
    if not isinstance(files, dict) or not isinstance(tensors, dict) or not isinstance(quantized, dict) or not isinstance(tied, dict):
        raise bad("'files', 'tensors', 'quantized' and 'tied' must be mappings")
    for fname, info in files.items():
        if not fname or "/" in fname or "\\" in fname or fname.startswith(".") or not isinstance(info, dict) or not is_int(info.get("bytes")):
            raise bad(f"file entry {fname!r}")
    for name, e in tensors.items():
        if not (isinstance(e, dict) and isinstance(e.get("file"), str) and e["file"] in files
                and isinstance(e.get("dtype"), str) and e["dtype"] in DTYPE_BYTES and isinstance(e.get("sha256"), str)
                and isinstance(e.get("shape"), list) and all(is_int(d) for d in e["shape"])):
            raise bad(f"entry of tensor {name!r}")
        c = e.get("codec")
        if "codec" in e and not (isinstance(c, dict) and is_int(e.get("stored_bytes")) and isinstance(e.get("stored_sha256"), str)
                                 and all(isinstance(c.get(k, ""), str) for k in ("codec", "mapping", "kind"))
                                 and _is_number_or_none(c.get("entropy_bits"))):
            raise bad(f"codec entry of tensor {name!r}")
    for name, q in quantized.items():
        if not (isinstance(q, dict) and isinstance(q.get("shape"), list) and len(q["shape"]) == 2
                and all(is_int(d, 1) for d in q["shape"]) and is_int(q.get("bits"), 0) and is_int(q.get("group_size"), -1)
                and isinstance(q.get("symmetric"), bool) and isinstance(q.get("bias", False), bool)
                and q.get("layout", "affine") in ("affine", "codebook", "mixed", "sparse24", "sparse50", "kquant")):
            raise bad(f"entry of quantized layer {name!r}")
        wrong = [k for k, ok in _LAYER_FIELDS.items() if k in q and not ok(q[k])]
        if wrong:
            raise bad(f"field {wrong[0]!r} of quantized layer {name!r} is {q[wrong[0]]!r}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items()):
        raise bad("'tied' must map tensor names to tensor names")
    side = m.get("sidecar_sha256", {})
    if not isinstance(side, dict) or not all(isinstance(k, str) and "/" not in k and isinstance(v, str) for k, v in side.items()):
        raise bad("'sidecar_sha256' must map file names to sha256 digests")


def _is_number_or_none(x: Any) -> bool:
    return x is None or (isinstance(x, (int, float)) and not isinstance(x, bool))


def _is_int_in(lo: int, hi: int, *, not_zero: bool = False):
    return lambda x: isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi and not (not_zero and x == 0)


# the values of a quantized layer's fields the readers use (docs/FORMAT.md; all but bits and group_size optional)
_LAYER_FIELDS = {
    "kind": lambda x: x in ("linear", "embedding", "head"), "tied_head": lambda x: isinstance(x, str) and bool(x),
    "bits": _is_int_in(0, 16), "group_size": _is_int_in(-1, 2**40, not_zero=True), "method": lambda x: isinstance(x, str),
    "mean_width": _is_number_or_none, "grid": lambda x: isinstance(x, str), "share": _is_int_in(1, 2**40),
    "scale_group": _is_int_in(-1, 2**40, not_zero=True), "width_bits": _is_int_in(1, 8),
    "codebook_bits": lambda x: x in (8, 16) and isinstance(x, int), "outliers": _is_int_in(0, 2**62),
    "row_scale": lambda x: isinstance(x, bool), "lowrank": check_lowrank,
    "gguf_type": lambda x: x in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"),
}


def _check_file(path: Path, fname: str, expected: int, entries: dict[str, Any]) -> None:
    """Size check; on truncation name the first tensor whose bytes are missing."""
    f = path / fname
    if not f.is_file():
        raise ArtifactError(f"{f} is missing")
    actual = f.stat().st_size
    if actual == expected:
        return
    bad = "its header"
    try:
        with open(f, "rb") as fh:
            (hlen,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(hlen))
        start = 8 + hlen
        beyond = [
            (info["data_offsets"][1], name)
            for name, info in header.items()
            if name != "__metadata__" and start + info["data_offsets"][1] > actual
        ]
        if beyond:
            bad = f"tensor {min(beyond)[1]}"
    except Exception:  # header itself damaged
        pass
    raise ArtifactError(f"{f} is truncated or altered ({actual} bytes, expected {expected}): {bad} is damaged")


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def read_tensors(
    path: str | os.PathLike, verify: bool = True, names: list[str] | None = None, workers: int | None = None,
    verify_payloads: bool = False,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(manifest, tensors) of an artifact, or of the named tensors only.

    Tensors are read, decoded and checked (sha256 of the decoded tensor; a coded payload's own sha256
    when that fails, to name the damage) a layer at a time in `workers` threads (default: one per
    available core), so the file is never held twice in memory. With `verify_payloads` every coded
    payload's own sha256 is checked as well: a changed byte that decodes to the same tensor (a codec's
    unused header or padding bits) is found too, which the model does not need but an integrity check does.
    """
    p = Path(path)
    manifest = read_manifest(p)
    entries = manifest["tensors"]
    for fname, info in manifest["files"].items():
        _check_file(p, fname, info["bytes"], entries)
    wanted = list(entries) if names is None else names
    for name in wanted:
        if name not in entries:
            raise ArtifactError(f"tensor {name} is not in {p}")
    layers: dict[str, dict[str, list[str]]] = {}  # file -> layer -> its tensors
    for name in wanted:
        layers.setdefault(entries[name]["file"], {}).setdefault(name.rpartition(".")[0], []).append(name)
    # one task per worker and file, holding every worker-th layer (each task opens its file once);
    # within a layer, the tensors that others decode with come first (coding.DECODE_FIRST), qweight last
    workers = max(1, min(workers or available_cores(), sum(len(v) for v in layers.values())))
    tasks = []
    for f, by_layer in layers.items():
        order = [sorted(g, key=_decode_rank) for g in by_layer.values()]
        tasks += [(f, [n for g in order[k::workers] for n in g]) for k in range(workers) if order[k::workers]]
    quantized = manifest.get("quantized", {})

    def run(task: tuple[str, list[str]]) -> dict[str, torch.Tensor]:
        fname, group = task
        return _read_group(p, fname, group, entries, quantized, verify, verify_payloads)

    tensors: dict[str, torch.Tensor] = {}
    if len(tasks) == 1:
        tensors.update(run(tasks[0]))
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=workers) as pool:
            for part in pool.map(run, tasks):
                tensors.update(part)
    return manifest, tensors


def _decode_rank(name: str) -> int:
    from .coding import DECODE_FIRST

    leaf = name.rpartition(".")[2]
    return 0 if leaf in DECODE_FIRST else 2 if leaf == "qweight" else 1


def _read_group(
    p: Path, fname: str, names: list[str], entries: dict[str, Any], quantized: dict[str, Any], verify: bool,
    verify_payloads: bool = False,
) -> dict[str, torch.Tensor]:
    from .codecs import release_scratch

    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(p / fname, framework="pt") as fh:
            stored = set(fh.keys())
            for name in names:
                if name not in stored:
                    raise ArtifactError(f"tensor {name} is missing from {p / fname}")
                out[name] = decode_checked(name, fh.get_tensor(name), entries[name], quantized, out, p / fname, verify,
                                           verify_payloads)
    except ArtifactError:
        raise
    except Exception as err:
        raise ArtifactError(f"{p / fname} could not be read ({err}); the artifact is corrupted") from err
    finally:
        release_scratch()
    return out


def decode_checked(name: str, t: torch.Tensor, e: dict[str, Any], quantized: dict[str, Any],
                   decoded: dict[str, torch.Tensor], where: Path, verify: bool, verify_payloads: bool = False
                   ) -> torch.Tensor:
    """A tensor as read from its file (`t`: the stored bytes, a coded payload where the manifest names a
    codec) decoded and checked against its manifest entry `e`; `decoded` holds the layer's tensors
    decoded so far (a qweight decodes with its qzeros). Damage is an ArtifactError naming the tensor."""
    from .codecs import CodecError
    from .coding import decode_tensor

    payload = t if "codec" in e else None

    def fail(message: str, cause: Exception | None = None) -> None:
        # the decoded tensor's sha256 covers every payload byte that matters; the payload's own
        # is checked only now, to say that it is the payload that is damaged
        if (verify or verify_payloads) and payload is not None and tensor_sha256(payload) != e["stored_sha256"]:
            raise ArtifactError(f"tensor {name} in {where}: its coded payload fails its sha256 check: "
                                "the artifact is corrupted") from cause
        raise ArtifactError(message) from cause

    if payload is not None:
        try:
            t = decode_tensor(name, t, e, quantized, decoded)
        except CodecError as err:
            fail(f"tensor {name} in {where} does not decode: {err}", err)
    if list(t.shape) != e["shape"] or _dtype_name(t) != e["dtype"]:
        fail(f"tensor {name} has shape/dtype {list(t.shape)}/{_dtype_name(t)}, manifest says {e['shape']}/{e['dtype']}")
    if verify and tensor_sha256(t) != e["sha256"]:
        fail(f"tensor {name} in {where} fails its sha256 check: the artifact is corrupted")
    if verify_payloads and payload is not None and tensor_sha256(payload) != e["stored_sha256"]:
        raise ArtifactError(f"tensor {name} in {where}: its coded payload fails its sha256 check "
                            "(it still decodes to the right tensor): the artifact is corrupted")
    return t
