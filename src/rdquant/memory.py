"""Keep freed host memory for reuse while big CPU jobs run (glibc only; a no-op elsewhere).

glibc serves every allocation above 32 MB with a fresh mmap and returns it on free, so each new
activation-sized tensor pays page faults on first touch. The pipeline and the evaluator allocate
such tensors constantly; keeping them in the heap made a GPTQ block ~25% faster here
(docs/notes/benchmarks-lab.md)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys
from collections.abc import Iterator

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM, _DEFAULT_MMAP_MAX = 128 * 1024, 65536


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


@contextlib.contextmanager
def retain_freed_memory() -> Iterator[None]:
    """Serve large allocations from the heap and do not trim it, for the duration of the block."""
    libc = _libc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**30)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM)
        libc.malloc_trim(0)


def trim() -> None:
    """Give the heap's free pages back to the OS (glibc's malloc_trim; a no-op elsewhere). A streamed
    model calls it after each forward: blocks read in one thread and freed in another otherwise leave
    the heap fragmented, and peak RSS drifted from +120 to +500 MB over a budget between runs."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def row_panels(rows: int, panels: int = 8) -> list[tuple[int, int]]:
    """(start, stop) of `panels` near-equal row ranges covering `rows`: how full-size steps (the GPTQ solve, the
    layer log, CVXQ's cell statistics) bound their float temporaries to a fraction of a matrix."""
    step = max(1, -(-rows // panels))
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]
