"""What rdquant may delete: only directories it recognises as its own (an artifact with an rdquant
manifest, a checkpoint of an interrupted run, its own temporary directories) or empty ones. Everything
else is refused with a one-line error before any work, whatever flag the user passed."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .errors import RdquantError

CHECKPOINT_MARKER = "rdquant-checkpoint.json"  # written first into every checkpoint directory
EXPORT_MARKER = "rdquant-export.json"  # written into every exported model directory
PROGRESS = "progress.json"  # a checkpoint's progress (pipeline.Checkpoint); the marker's stand-in in older ones


def _json_field(path: Path, key: str) -> object:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get(key) if isinstance(data, dict) else None


def is_own_artifact(path: Path) -> bool:
    """A directory whose manifest.json is an rdquant manifest (even if the tensors are damaged)."""
    from .artifact import MANIFEST

    return path.is_dir() and _json_field(path / MANIFEST, "format") == "rdquant"


def is_own_checkpoint(path: Path) -> bool:
    """A checkpoint directory of an interrupted rdquant run."""
    if not path.is_dir():
        return False
    if (path / CHECKPOINT_MARKER).is_file():
        return _json_field(path / CHECKPOINT_MARKER, "producer") == "rdquant"
    return _json_field(path / PROGRESS, "key") is not None


def is_own_export(path: Path) -> bool:
    """A model directory `rdquant export` wrote."""
    return path.is_dir() and _json_field(path / EXPORT_MARKER, "producer") == "rdquant"


def blocks_done(path: Path) -> int:
    """Finished blocks recorded in a checkpoint directory (0 when there is none or it is unreadable)."""
    n = _json_field(path / PROGRESS, "blocks_done")
    return n if isinstance(n, int) and not isinstance(n, bool) else 0


def is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def owned(path: Path) -> bool:
    """True if rdquant may delete `path`: its own artifact or checkpoint, or an empty directory."""
    return is_own_artifact(path) or is_own_checkpoint(path) or is_own_export(path) or is_empty_dir(path)


def check_output(path: str | os.PathLike, overwrite: bool, flag: str = "--out") -> None:
    """Refuse an output path that exists unless it is rdquant's own and `overwrite` is set (or it is an
    empty directory); refuse a path whose parent cannot be written. Touches nothing."""
    p = Path(path)
    if p.exists() or p.is_symlink():
        if p.is_symlink() or not p.is_dir():
            raise RdquantError(f"{flag} {p} exists and is not a directory: rdquant will not replace it; choose another {flag}")
        if is_empty_dir(p):
            pass
        elif not (is_own_artifact(p) or is_own_checkpoint(p) or is_own_export(p)):
            raise RdquantError(f"{flag} {p} exists and is not an rdquant artifact: rdquant never deletes it "
                               f"(not even with --overwrite); choose another {flag}")
        elif not overwrite:
            raise RdquantError(f"{flag} {p} already holds rdquant's output; pass --overwrite to replace it, "
                               f"or choose another {flag}")
    check_writable_parent(p, flag)


def check_writable_parent(path: str | os.PathLike, flag: str = "--out") -> None:
    """Refuse a path whose nearest existing parent directory cannot be written."""
    p = Path(path)
    parent = p.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise RdquantError(f"cannot write {flag} {p}: {parent} is not writable; choose another {flag}")


def remove_owned(path: str | os.PathLike) -> None:
    """Delete `path` if rdquant owns it (see `owned`); refuse anything else. A missing path is fine."""
    p = Path(path)
    if not (p.exists() or p.is_symlink()):
        return
    if p.is_symlink() or not owned(p):
        raise RdquantError(f"{p} is not an rdquant artifact or checkpoint: rdquant will not delete it")
    shutil.rmtree(p)


def fresh_path(path: str | os.PathLike) -> Path:
    """`path` if it does not exist, else the first of path-2, path-3, ... that does not."""
    p = Path(path)
    k = 2
    while p.exists() or p.is_symlink() or p.with_name(p.name + ".partial").exists():
        p = Path(path).with_name(f"{Path(path).name}-{k}")
        k += 1
    return p
