"""Memory-limited inference (`load(..., max_memory=...)`): decoder blocks that do not fit a memory budget
stay in the artifact. Every forward reads each such block from storage, decodes it, computes and
releases it, while a background reader fetches the next one; coded artifacts read fewer bytes.

The budget covers the model's tensors as held in memory: everything outside the decoder blocks
(embedding, head, final norm), the blocks kept resident (the first ones that fit) and the slots of
the blocks in flight (the one computing and the one being read, with its coded payloads while it
decodes). The Python runtime, activations, the KV cache and the dequantized weight of the
layer computing are outside it: `StreamStats` and bench/offload.py measure that overhead.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .artifact import DTYPE_BYTES, _decode_rank, available_cores, decode_checked, entry_nbytes, stored_nbytes
from .errors import ArtifactError, RdquantError


@dataclass(frozen=True)
class Storage:
    """How streamed blocks are read. `bandwidth` (bytes/s) simulates slower storage: a read that took
    less than bytes / bandwidth waits out the rest (benchmarks: eMMC ~0.25 GB/s, UFS ~1, NVMe ~3).
    `drop_cache` evicts what was read from the OS page cache (posix_fadvise DONTNEED), so every token
    reads the storage device rather than RAM the budget does not count."""

    bandwidth: float | None = None
    drop_cache: bool = False

    def __post_init__(self) -> None:
        if self.bandwidth is not None and not self.bandwidth > 0:
            raise RdquantError(f"storage bandwidth must be a positive number of bytes/s, not {self.bandwidth!r}")


@dataclass
class Plan:
    """Which decoder blocks stay in memory under a budget (bytes), and what each part costs."""

    budget: int | None
    fixed: int  # bytes outside the decoder blocks: always resident
    blocks: list[int]  # each block's bytes in memory
    slots: list[int]  # each block's bytes while it is read and decoded (its coded payloads added)
    resident: list[int]
    streamed: list[int]
    prefetch: int  # blocks read ahead while one computes (0 or 1)

    @property
    def total(self) -> int:
        """Bytes of the whole model in memory."""
        return self.fixed + sum(self.blocks)

    @property
    def minimum(self) -> int:
        """The smallest budget the model runs in: the fixed part and one block slot, read as it is needed."""
        return self.fixed + max(self.slots, default=0)

    @property
    def working(self) -> int:
        """Bytes held for the streamed blocks in flight: one being read (with its stored bytes while they
        decode) and, with read-ahead, one computing meanwhile (decoded)."""
        if not self.streamed:
            return 0
        return max(self.slots[i] for i in self.streamed) + self.prefetch * max(self.blocks[i] for i in self.streamed)

    @property
    def accounted(self) -> int:
        """The most bytes the plan ever holds: fixed, resident blocks and the slots in flight."""
        return self.fixed + sum(self.blocks[i] for i in self.resident) + self.working

    def describe(self) -> str:
        mib = 2**20
        if not self.streamed:
            return f"all {len(self.blocks)} blocks resident ({self.total / mib:,.1f} MiB)"
        return (f"{len(self.resident)} of {len(self.blocks)} blocks resident, {len(self.streamed)} streamed "
                f"({sum(self.blocks[i] for i in self.streamed) / mib:,.1f} MiB read per forward, "
                f"{'one block read ahead' if self.prefetch else 'no read-ahead'}); "
                f"{self.accounted / mib:,.1f} MiB of {self.budget / mib:,.1f} MiB budgeted")  # type: ignore[operator]


def parse_budget(max_memory: str | int | None) -> int | None:
    """'200MB', '1.5GiB' or a byte count -> bytes (None: no limit)."""
    from .config import parse_size

    if max_memory is None:
        return None
    budget = parse_size(max_memory)
    if budget is None or budget <= 0:
        raise RdquantError(f"--max-memory must be a positive size such as 200MB, not {max_memory!r}")
    return budget


def not_streamable(path: Any) -> RdquantError:
    """The error for a memory budget given with a model that is not an rdquant artifact."""
    if not Path(path).exists() and "/" in str(path):
        return RdquantError(f"{path} does not exist; give an rdquant artifact directory to --max-memory runs")
    return RdquantError(f"--max-memory streams an rdquant artifact's blocks; {path} is not one: compress it first")


def block_of(name: str, prefix: str) -> int | None:
    """The decoder block a tensor name belongs to ('model.layers.12.mlp.up_proj.qweight' -> 12), else None."""
    if not name.startswith(prefix + "."):
        return None
    head = name[len(prefix) + 1:].partition(".")[0]
    return int(head) if head.isdigit() else None


def block_prefix(manifest: dict[str, Any]) -> str:
    """The decoder blocks' name prefix ('model.layers'), read off the quantized layers' names."""
    counts: dict[str, set[str]] = {}
    for name in manifest["quantized"]:
        parts = name.split(".")
        for k, p in enumerate(parts):
            if p.isdigit():
                counts.setdefault(".".join(parts[:k]), set()).add(p)
                break
    if not counts:
        raise RdquantError("this artifact has no quantized decoder blocks to stream; load it without --max-memory")
    return max(counts, key=lambda k: len(counts[k]))


def memory_dtype(name: str, e: dict[str, Any], quantized_keys: set[str], dtype: torch.dtype) -> torch.dtype:
    """A tensor's dtype once loaded: float tensors outside the quantized layers take the model's dtype."""
    is_float = e["dtype"] in ("float16", "bfloat16", "float32", "float64")
    return dtype if is_float and name not in quantized_keys else getattr(torch, e["dtype"])


def memory_bytes(name: str, e: dict[str, Any], quantized_keys: set[str], dtype: torch.dtype) -> int:
    """A tensor's bytes once loaded."""
    return entry_nbytes(e) // DTYPE_BYTES[e["dtype"]] * torch.empty(0, dtype=memory_dtype(
        name, e, quantized_keys, dtype)).element_size()


def decode_workers() -> int:
    """Threads that decode streamed layers: half the cores (the rest compute), at least one."""
    return max(1, available_cores() // 2)


def make_plan(manifest: dict[str, Any], budget: int | None, dtype: torch.dtype = torch.float32,
              prefix: str | None = None, inflight: int | None = None) -> Plan:
    """Fit the model into `budget` bytes: the parts outside the blocks, then one read-ahead slot if it
    fits, then as many leading blocks as fit; the rest are streamed. An impossible budget is a one-line
    error naming the smallest that works. budget None: the sizes only, everything resident."""
    from .runtime import QUANT_BUFFERS

    prefix = prefix or block_prefix(manifest)
    inflight = inflight or decode_workers() + 1
    quant_keys = {f"{n}.{k}" for n in manifest["quantized"] for k in QUANT_BUFFERS}
    by_block: dict[int, list[str]] = {}
    fixed = 0
    for name, e in manifest["tensors"].items():
        b = block_of(name, prefix)
        if b is None:
            fixed += memory_bytes(name, e, quant_keys, dtype)
        else:
            by_block.setdefault(b, []).append(name)
    n_blocks = max(by_block, default=-1) + 1
    blocks, slots = [], []
    for b in range(n_blocks):
        names = by_block.get(b, [])
        mem = sum(memory_bytes(n, manifest["tensors"][n], quant_keys, dtype) for n in names)
        # while a block is read, the stored bytes of up to `inflight` layers (coded payloads, float tensors
        # before their dtype conversion) are held beside what they decode to
        owners: dict[str, int] = {}
        for n in names:
            e = manifest["tensors"][n]
            if "codec" in e or memory_bytes(n, e, quant_keys, dtype) != stored_nbytes(e):
                owners[n.rpartition(".")[0]] = owners.get(n.rpartition(".")[0], 0) + stored_nbytes(e)
        extra = sum(sorted(owners.values(), reverse=True)[:inflight])
        blocks.append(mem)
        slots.append(mem + extra)
    plan = Plan(budget, fixed, blocks, slots, list(range(n_blocks)), [], 0)
    if budget is None or plan.total <= budget:
        return plan
    if budget < plan.minimum:
        mib = 2**20
        given = f"{budget / mib:,.1f} MiB" if budget >= mib // 10 else f"{budget:,} bytes"
        raise RdquantError(f"--max-memory {given} is below the smallest budget this model runs in, "
                           f"{plan.minimum / mib:,.1f} MiB ({fixed / mib:,.1f} MiB outside the decoder blocks and "
                           f"{max(slots) / mib:,.1f} MiB for the block computing): raise --max-memory")
    for prefetch in (1, 0):
        room = budget - fixed - max(slots) - prefetch * max(blocks)
        if room < 0:
            continue
        resident: list[int] = []
        for b in range(n_blocks):
            if blocks[b] > room:
                break
            resident.append(b)
            room -= blocks[b]
        return Plan(budget, fixed, blocks, slots, resident, [b for b in range(n_blocks) if b not in resident], prefetch)
    raise AssertionError("unreachable: budget >= minimum admits prefetch 0")


@dataclass
class StreamStats:
    """What streaming cost so far: bytes read from storage, time the reader spent, time forwards waited."""

    blocks_read: int = 0
    bytes_read: int = 0
    read_s: float = 0.0  # in the file reads (throttling included)
    decode_s: float = 0.0  # decoding and checking
    wait_s: float = 0.0  # forwards blocked on a block not yet read
    peak_held: int = 0  # most bytes of streamed blocks held at once (read, decoding or computing)
    held: int = field(default=0, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in vars(self).items() if k != "held"}


class _Shard:
    """One safetensors file of the artifact, open for the streamer's lifetime: an artifact replaced
    meanwhile (writes are renames) is still read consistently from the file that was opened."""

    def __init__(self, path: Path, storage: Storage) -> None:
        self.path, self.storage = path, storage
        self.fh = open(path, "rb", buffering=0)
        try:
            (hlen,) = struct.unpack("<Q", self.fh.read(8))
            header = json.loads(self.fh.read(hlen))
        except (struct.error, ValueError, UnicodeDecodeError) as e:
            self.fh.close()
            raise ArtifactError(f"{path} has a damaged header ({e}): the artifact is corrupted") from e
        self.base = 8 + hlen
        self.offsets = {k: tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__"}

    def read(self, name: str, nbytes: int, stats: StreamStats) -> torch.Tensor:
        """The stored bytes of one tensor (uint8), read with the storage's simulated bandwidth."""
        if name not in self.offsets:
            raise ArtifactError(f"tensor {name} is missing from {self.path}")
        begin, end = self.offsets[name]
        if end - begin != nbytes:
            raise ArtifactError(f"tensor {name} in {self.path} holds {end - begin} bytes, the manifest says {nbytes}: "
                                "the artifact is corrupted")
        t0 = time.perf_counter()
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view, done = memoryview(buf.numpy()), 0
        self.fh.seek(self.base + begin)
        while done < nbytes:
            got = self.fh.readinto(view[done:])
            if not got:
                raise ArtifactError(f"{self.path} ends inside tensor {name}: the artifact is truncated")
            done += got
        if self.storage.drop_cache and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fh.fileno(), self.base + begin, nbytes, os.POSIX_FADV_DONTNEED)
        if self.storage.bandwidth:
            rest = nbytes / self.storage.bandwidth - (time.perf_counter() - t0)
            if rest > 0:
                time.sleep(rest)
        stats.read_s += time.perf_counter() - t0
        stats.bytes_read += nbytes
        return buf

    def close(self) -> None:
        self.fh.close()


class BlockStreamer:
    """Installs streamed blocks' tensors for their forward only: a pre-forward hook takes the block
    (read ahead, or read now), a forward hook releases it. One reader thread reads blocks in forward
    order (cyclically: after the last streamed block comes the first, for the next token) and hands each
    layer's bytes to the decode threads while it reads the next layer."""

    def __init__(self, path: Path, manifest: dict[str, Any], model: nn.Module, plan: Plan, prefix: str,
                 dtype: torch.dtype, device: torch.device, storage: Storage | None = None, verify: bool = True) -> None:
        from .runtime import QUANT_BUFFERS, QuantLinear

        self.path, self.manifest, self.plan, self.dtype = path, manifest, plan, dtype
        self.storage = storage or Storage()
        self.stats = StreamStats()
        self.verify_left = set(plan.streamed) if verify else set()  # each block is checked on its first read
        self.quant_keys = {f"{n}.{k}" for n in manifest["quantized"] for k in QUANT_BUFFERS}
        self.names: dict[int, list[str]] = {b: [] for b in plan.streamed}
        for name in manifest["tensors"]:
            b = block_of(name, prefix)
            if b in self.names:
                self.names[b].append(name)
        for b in self.names:  # a layer's tensors together (one decode task), those others decode with first
            owners = {n.rpartition(".")[0]: k for k, n in reversed(list(enumerate(self.names[b])))}
            self.names[b].sort(key=lambda n: (owners[n.rpartition(".")[0]], _decode_rank(n)))
        self.blocks = model.get_submodule(prefix)
        self.device = torch.device(device)
        self.installed: set[int] = set()
        self.shards: dict[str, _Shard] = {}
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rdquant-stream")  # reads, in order
        # decodes a layer's tensors while the reader reads the next layer's (zstd and the unpacking release the GIL)
        workers = decode_workers()
        self.decoders = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rdquant-decode")
        self.pending: dict[int, Future] = {}
        self.lock = threading.Lock()
        self.inflight = threading.Semaphore(workers + 1)  # layers read but not yet decoded (Plan.slots counts them)
        self.copy_stream = None
        self.slots: dict[int, list[tuple[nn.Module, str, bool]]] = {}
        for b in plan.streamed:
            block = self.blocks[b]
            where = []
            for name in self.names[b]:
                owner, _, leaf = name[len(prefix) + 1 + len(str(b)) + 1:].rpartition(".")
                module = block.get_submodule(owner) if owner else block
                where.append((module, leaf, leaf in module._parameters))
            self.slots[b] = where
        self.linears = {b: [m for m in self.blocks[b].modules() if isinstance(m, QuantLinear)] for b in plan.streamed}
        self.hooks = []
        if self.device.type == "cpu":  # the freed blocks go back to the OS after every forward (memory.trim)
            self.hooks.append(model.register_forward_hook(_trim_hook))
        for b in plan.streamed:
            self.hooks.append(self.blocks[b].register_forward_pre_hook(self._pre_hook(b)))
            self.hooks.append(self.blocks[b].register_forward_hook(self._post_hook(b)))
        self._finalizer = weakref.finalize(self, BlockStreamer._shutdown, self.pool, self.decoders, self.shards)

    # -- placing tensors ---------------------------------------------------------------------------
    def placeholders(self) -> None:
        """Give every streamed tensor an empty stand-in on the model's device (the state until a forward)."""
        for b in self.plan.streamed:
            self._uninstall(b)

    def _install(self, b: int, tensors: list[torch.Tensor]) -> None:
        for (module, leaf, is_param), t in zip(self.slots[b], tensors):
            if is_param:
                module._parameters[leaf] = nn.Parameter(t, requires_grad=False)
            else:
                module._buffers[leaf] = t
        for m in self.linears[b]:
            m.clear_cache()

    def _uninstall(self, b: int) -> None:
        for (module, leaf, is_param), name in zip(self.slots[b], self.names[b]):
            dtype = self._dtype_of(name)
            empty = torch.empty(0, dtype=dtype, device=self.device)
            if is_param:
                module._parameters[leaf] = nn.Parameter(empty, requires_grad=False)
            else:
                module._buffers[leaf] = empty
        for m in self.linears.get(b, []):
            m.clear_cache()

    def _dtype_of(self, name: str) -> torch.dtype:
        return memory_dtype(name, self.manifest["tensors"][name], self.quant_keys, self.dtype)

    # -- reading -----------------------------------------------------------------------------------
    def _read_block(self, b: int) -> tuple[list[torch.Tensor], Any]:
        """In the reader thread: a block's tensors read, decoded, checked (first read only), converted
        and (on a GPU) copied to the device on a side stream; returns them and the copy's event."""
        entries = self.manifest["tensors"]
        verify = b in self.verify_left
        slot = self.plan.slots[b]
        with self.lock:  # the consumer gives it back (_release) once the block is done with, or dropped
            self.stats.held += slot
            self.stats.peak_held = max(self.stats.peak_held, self.stats.held)
        tasks: list[Future] = []
        layer: list[tuple[str, torch.Tensor, Path]] = []
        try:
            for k, name in enumerate(self.names[b]):
                e = entries[name]
                shard = self.shards.get(e["file"])
                if shard is None:
                    shard = self.shards[e["file"]] = _Shard(self.path / e["file"], self.storage)
                if not layer:
                    self.inflight.acquire()  # given back by the decode task of this layer
                layer.append((name, shard.read(name, stored_nbytes(e), self.stats), shard.path))
                nxt = self.names[b][k + 1] if k + 1 < len(self.names[b]) else None
                if nxt is None or nxt.rpartition(".")[0] != name.rpartition(".")[0]:
                    tasks.append(self.decoders.submit(self._decode_layer, layer, verify))
                    layer = []
            decoded: dict[str, torch.Tensor] = {}
            for task in tasks:
                decoded.update(task.result())
        except BaseException:
            if layer:  # read in part, never handed to a decoder
                self.inflight.release()
            for task in tasks:  # the decoders finish (and give back their places) before the error goes up
                task.exception()
            raise
        finally:
            with self.lock:  # decoded (or failed): the stored bytes are gone; the consumer releases the rest
                self.stats.held -= slot - self.plan.blocks[b]
        self.verify_left.discard(b)
        out = [decoded[n].to(self._dtype_of(n)) for n in self.names[b]]
        event = None
        if self.device.type == "cuda":
            if self.copy_stream is None:
                self.copy_stream = torch.cuda.Stream(self.device)
            with torch.cuda.stream(self.copy_stream):
                out = [t.pin_memory().to(self.device, non_blocking=True) for t in out]
                event = torch.cuda.Event()
                event.record(self.copy_stream)
        self.stats.blocks_read += 1
        return out, event

    def _decode_layer(self, raw: list[tuple[str, torch.Tensor, Path]], verify: bool) -> dict[str, torch.Tensor]:
        """In a decode thread: one layer's tensors from their stored bytes, decoded and (first read) checked."""
        try:
            return self._decode(raw, verify)
        finally:
            del raw[:]  # the stored bytes go before the next layer is read
            self.inflight.release()

    def _decode(self, raw: list[tuple[str, torch.Tensor, Path]], verify: bool) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        entries, quantized = self.manifest["tensors"], self.manifest["quantized"]
        out: dict[str, torch.Tensor] = {}
        for name, t, where in raw:  # (the decoders' scratch buffers stay with their threads: runtime overhead)
            e = entries[name]
            if "codec" not in e:
                t = t.view(getattr(torch, e["dtype"])).reshape(e["shape"])
            try:
                out[name] = decode_checked(name, t, e, quantized, out, where, verify)
            except ArtifactError:
                raise
            except Exception as err:  # whatever a damaged payload makes a decoder raise
                raise ArtifactError(f"tensor {name} in {where} does not decode ({type(err).__name__}: {err}); "
                                    "the artifact is corrupted") from err
        with self.lock:
            self.stats.decode_s += time.perf_counter() - t0
        return out

    def _schedule(self, b: int) -> None:
        if b not in self.pending:
            self.pending[b] = self.pool.submit(self._read_block, b)

    def _take(self, b: int) -> list[torch.Tensor]:
        fut = self.pending.pop(b, None)
        if fut is None:  # not read ahead (the first forward, or blocks run out of order): drop the rest, read now
            self._drop_pending()
            fut = self.pool.submit(self._read_block, b)
        t0 = time.perf_counter()
        try:
            tensors, event = fut.result()
        except BaseException:
            self._release(b)
            raise
        self.stats.wait_s += time.perf_counter() - t0
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in tensors:
                t.record_stream(current)
        return tensors

    def _drop_pending(self) -> None:
        for b, fut in list(self.pending.items()):
            try:
                fut.result()
            except Exception:  # a failed read ahead of an abandoned forward: read again when needed
                pass
            self._release(b)
        self.pending.clear()

    def _release(self, b: int) -> None:
        with self.lock:
            self.stats.held -= self.plan.blocks[b]

    def _next(self, b: int, k: int) -> int:
        order = self.plan.streamed
        return order[(order.index(b) + k) % len(order)]

    def _pre_hook(self, b: int):
        def hook(module: nn.Module, args: Any) -> None:
            if b in self.installed:  # a forward that raised inside this block left it installed
                self._post_hook(b)(module, args, None)
            self._install(b, self._take(b))
            self.installed.add(b)
            for k in range(1, self.plan.prefetch + 1):
                nxt = self._next(b, k)
                if nxt != b:
                    self._schedule(nxt)
        return hook

    def _post_hook(self, b: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._uninstall(b)
            self._release(b)
            self.installed.discard(b)
        return hook

    # -- lifetime ----------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop reading ahead and close the files (the model then cannot run its streamed blocks)."""
        self._drop_pending()
        for h in self.hooks:
            h.remove()
        self._finalizer()

    @staticmethod
    def _shutdown(pool: ThreadPoolExecutor, decoders: ThreadPoolExecutor, shards: dict[str, _Shard]) -> None:
        pool.shutdown(wait=True)
        decoders.shutdown(wait=True)
        for s in shards.values():
            s.close()
        shards.clear()


def _trim_hook(module: nn.Module, args: Any, output: Any) -> None:
    from .memory import trim

    trim()


def streamer_of(model: nn.Module) -> BlockStreamer | None:
    """The streamer of a model loaded with a memory budget (None when everything is resident)."""
    return getattr(model, "_rdquant_streamer", None)
