"""The sequential block pipeline: calibrate and quantize one decoder block at a time.

1. Capture the inputs of block 0 (hidden states + every keyword argument the blocks take).
2. For each block: find its linears' execution order and group those that share an input into
   stages (q/k/v, then o, then gate/up, then down for Llama). Stage by stage, run the block only as
   far as that stage (the forward stops at the stage's last linear), accumulate H = 2 X^T X / n,
   quantize, swap in QuantLinear - so later stages see the quantized earlier ones (true sequential).
3. Run the finished block to produce the next block's inputs. Only the current block is on the
   compute device. Finished blocks are checkpointed, so an interrupted run can resume.
Blocks come from a `BlockSource` (source.py): with a streamed one (safetensors read lazily, synthetic
weights) only the current block is in memory at all, and each finished block's tensors go straight
to the checkpoint, from which the artifact is assembled. Activations between blocks stay in the
model's dtype, on the device when they fit, else in pinned CPU memory moved per batch.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .config import CompressConfig, LayerLog
from .errors import RdquantError
from .hessian import HessianAccumulator
from .lowrank import adapter_nbytes, fit_adapters
from .memory import retain_freed_memory, row_panels
from .methods import METHODS, state_to_dict
from .methods.gptq import proxy_error
from .models import block_linears, find_blocks, set_submodule
from .runtime import QuantLinear
from .safety import CHECKPOINT_MARKER, PROGRESS, remove_owned
from .source import BlockSource, as_source

INPUTS_EVERY_S = 120.0  # the next block's inputs are checkpointed at most this often, unless small
METHOD_STATE = "method_state.json"  # a checkpoint's copy of the method's run-wide state (cvxq: the allocation)
SMALL_INPUTS = 64 * 2**20


class _StopForward(Exception):
    """Raised from a hook once a partial forward has produced what the pipeline needs."""


@dataclass
class Chunk:
    """A batch of calibration windows at the current block's input."""

    hidden: torch.Tensor  # where it waits between passes (the device, or pinned CPU memory)
    kwargs: dict[str, Any]
    device: torch.device | None = None  # where the block runs (None: where `hidden` is)


@dataclass
class PipelineState:
    """What the pipeline produced: per-layer logs and which blocks are done."""

    blocks_done: int = 0
    logs: list[LayerLog] = field(default_factory=list)
    method_state: Any = None
    tuning: dict | None = None  # --tune-scope block: what the blocks' tuning did (summed over this run's blocks)

    def add_tuning(self, done: dict, steps: int) -> None:
        if not done.get("tuned_layers"):
            return
        t = self.tuning or {"scope": "block", "steps_per_block": steps, "blocks": 0, "tuned_layers": 0,
                            "parameters": 0, "seconds": 0.0, "error_before": [], "error_after": []}
        t["blocks"] += 1
        for k in ("tuned_layers", "parameters", "seconds"):
            t[k] += done[k]
        t["error_before"].append(round(done["error_before"], 6))  # per block: relative output error, chunk 0
        t["error_after"].append(round(done["error_after"], 6))
        t["seconds"] = round(t["seconds"], 2)
        self.tuning = t


def _move_outside_blocks(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
    """Move every parameter/buffer that is not inside a decoder block to `device`, except an untied output
    head: the forward stops at block 0, so the head (1 GiB in bf16 at a 128k vocabulary and 4096 wide)
    would only take GPU memory."""
    inside = {id(m) for b in blocks for m in b.modules()}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if head is not None and emb is not None and getattr(head, "weight", None) is getattr(emb, "weight", None):
        head = None  # tied: the embedding's own weight
    for m in model.modules():
        if id(m) in inside or m is blocks or m is head:
            continue
        for k, p in m._parameters.items():
            if p is not None:
                p.data = p.data.to(device)
        for k, b in m._buffers.items():
            if b is not None:
                m._buffers[k] = b.to(device)


def _park(t: torch.Tensor, home: torch.device) -> torch.Tensor:
    """Where activations wait between passes: `home` (pinned when that is the CPU and t is on a GPU)."""
    if t.device == home:
        return t
    if home.type == "cpu" and t.is_cuda:
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return out.copy_(t, non_blocking=True)
    return t.to(home)


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor, batch_size: int, device: torch.device,
    home: torch.device | None = None,
) -> list[Chunk]:
    """Run the model up to block 0 for each batch of windows; keep hidden states (at `home`, default
    the device) and kwargs (on the device: masks and rotary tables are small)."""
    chunks: list[Chunk] = []
    home = home or device

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        for k in ("past_key_value", "past_key_values"):
            if k in kwargs:
                kwargs[k] = None
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        chunks.append(Chunk(_park(hidden, home), kwargs, device))
        raise _StopForward

    _move_outside_blocks(model, blocks, device)
    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(0, input_ids.shape[0], batch_size):
            try:
                model(input_ids[i : i + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
        _move_outside_blocks(model, blocks, torch.device("cpu"))
    if len(chunks) != -(-input_ids.shape[0] // batch_size):
        raise RdquantError("could not capture the inputs of the first decoder block")
    return chunks


def _attach_kv(block: nn.Module, cfg: CompressConfig) -> None:
    from .kvcache import attach, spec_of

    attach(block, spec_of(cfg))


def kv_calibrate_block(block: nn.Module, chunks: list[Chunk], cfg: CompressConfig) -> None:
    """Two-dimensional KV quantization of this block's attention on its calibration inputs (kvcache.py)."""
    from .kvcache import spec_of

    calibrate_block_kv(block, chunks, spec_of(cfg), None if cfg.kv_smooth == -1 else cfg.kv_smooth, cfg.kv_shift)


def calibrate_block_kv(block: nn.Module, chunks: list[Chunk], spec: Any, key_alpha: float | None, shifts: bool) -> list:
    """kvcache.calibrate_modules for one block's attention, its calibration forwards run over `chunks`."""
    from .kvcache import attention_modules, cache_kwarg, calibrate_modules

    def run(extra: dict[str, Any]) -> None:
        for c in chunks:
            _block_output(block, Chunk(c.hidden, {**c.kwargs, **extra}, c.device))

    return calibrate_modules(attention_modules(block), run, spec, key_alpha, shifts, cache_kwarg(block))


def kv_crr_block(block: nn.Module, source: BlockSource, i: int, n_blocks: int, chunks: list[Chunk],
                 cfg: CompressConfig, device: torch.device) -> None:
    """WKVQuant's cross-block reconstruction of block i's KV transforms (kvcache.crr_block), the loss taken
    after the next cfg.kv_crr blocks, loaded in full precision from the source for it."""
    from .kvcache import crr_block

    nxt = list(range(i + 1, min(i + 1 + cfg.kv_crr, n_blocks)))
    following = [source.load(j, device) for j in nxt]
    try:
        crr_block(block, following, [(c.hidden, c.kwargs, c.device) for c in chunks], cfg.kv_crr_steps, cfg.kv_crr_lr)
    finally:
        for j in nxt:
            source.release(j)


def _block_output(block: nn.Module, chunk: Chunk) -> torch.Tensor:
    hidden = chunk.hidden
    if chunk.device is not None and hidden.device != chunk.device:
        hidden = hidden.to(chunk.device, non_blocking=True)
    out = block(hidden, **chunk.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


class ActivationReuse:
    """Serve a block submodule's output from the previous pass instead of recomputing it.

    Between two passes over the same block inputs only the linears of one stage change. A submodule
    that finished before the first of those linears started (in the previous pass) computed exactly
    what it would compute again, so its cached output is reused. This removes most recomputation
    from true-sequential GPTQ (each linear runs about once per chunk instead of once per stage).
    Moreover, a module whose output *is* the output of the changed linear (its tail: o_proj for
    attention, down_proj for the MLP, found by `discover_stages`) is answered by running just that
    linear on its input, recorded by the Hessian pass. Caches live for one block and hold at most
    `budget` bytes (what does not fit is recomputed, with the same result). `bypass` turns it all off
    (for the exactness check).
    """

    def __init__(self, block: nn.Module, tails: dict[str, tuple[str, int]] | None = None,
                 budget: float = float("inf")) -> None:
        self.block = block
        self.budget, self.used = budget, 0
        self.tails = tails or {}  # module -> (tail linear, number of None outputs after it)
        self.inputs: dict[tuple[str, int], torch.Tensor] = {}
        self.shortcut: dict[str, tuple[str, int]] = {}
        self.cache: dict[tuple[str, int], Any] = {}
        self.reusable: set[str] = set()
        self.finished: set[str] = set()  # finished before the mark in the current pass
        self.marked = False
        self.chunk = 0
        self.bypass = False
        self._patched: dict[int, nn.Module] = {}

    def _patch_new_modules(self) -> None:
        """Wrap every submodule not wrapped yet (quantization swaps in new QuantLinear modules)."""
        for name, mod in self.block.named_modules():
            if name and id(mod) not in self._patched:
                mod.forward = self._wrap(name, mod.forward)
                self._patched[id(mod)] = mod

    def _wrap(self, name: str, forward: Callable) -> Callable:
        def wrapped(*args, **kwargs):
            if self.bypass:
                return forward(*args, **kwargs)
            key = (name, self.chunk)
            if name in self.reusable and key in self.cache:
                out = self.cache[key]
            elif name in self.shortcut and (self.shortcut[name][0], self.chunk) in self.inputs:
                tail, extra = self.shortcut[name]
                y = self.block.get_submodule(tail)(self.inputs[(tail, self.chunk)])
                out = (y, *([None] * extra)) if extra else y
            else:
                out = forward(*args, **kwargs)
            if not self.marked:
                if key not in self.cache and self._fits(out):
                    self.cache[key] = out
                self.finished.add(name)
            return out

        return wrapped

    def _fits(self, out: Any) -> bool:
        """Count `out` against the budget; False (do not keep it) if it would exceed it."""
        n = _nbytes(out)
        if self.used + n > self.budget:
            return False
        self.used += n
        return True

    def begin_pass(self, changed: str | None = None) -> None:
        """A new pass; `changed` is the first linear quantized since the last one (if any)."""
        self._patch_new_modules()
        self.reusable, self.finished = self.finished, set()
        self.cache = {k: v for k, v in self.cache.items() if k[0] in self.reusable}
        self.shortcut = {m: t for m, t in self.tails.items() if t[0] == changed}
        self.inputs = {k: v for k, v in self.inputs.items() if k[0] == changed}
        self.used = sum(_nbytes(v) for v in (*self.cache.values(), *self.inputs.values()))

    def record_input(self, linear: str, x: torch.Tensor) -> None:
        """The input of a linear about to change (the Hessian pass sees it for every chunk)."""
        if any(t[0] == linear for t in self.tails.values()) and self._fits(x):
            self.inputs[(linear, self.chunk)] = x

    def begin_chunk(self, k: int) -> None:
        self.chunk, self.marked = k, False

    def mark(self) -> None:
        """The first linear changed by this pass's stage starts now: nothing later is reusable."""
        self.marked = True

    def close(self) -> None:
        for mod in self._patched.values():
            del mod.forward
        self._patched, self.cache, self.inputs = {}, {}, {}


def _nbytes(out: Any) -> int:
    """Bytes of a tensor or of the tensors in a tuple (a cached module output)."""
    if isinstance(out, torch.Tensor):
        return out.nbytes
    if isinstance(out, (tuple, list)):
        return sum(_nbytes(o) for o in out)
    return 0


def _run_pass(
    block: nn.Module,
    chunks: list[Chunk],
    reuse: ActivationReuse | None,
    on_output: Callable[[int, torch.Tensor], None] | None = None,
    changed: str | None = None,
) -> None:
    """One forward of the block over every chunk (each may stop early via _StopForward)."""
    if reuse:
        reuse.begin_pass(changed)
    for k, c in enumerate(chunks):
        if reuse:
            reuse.begin_chunk(k)
        try:
            out = _block_output(block, c)
        except _StopForward:
            continue
        if on_output:
            on_output(k, out)


@torch.no_grad()
def block_targets(block: nn.Module, chunks: list[Chunk]) -> list[torch.Tensor]:
    """The float block's output on every chunk, parked where the chunk's hidden states wait (block tuning's
    targets: one more copy of the calibration activations while the block is solved)."""
    return [_park(_block_output(block, c), c.hidden.device) for c in chunks]


@torch.no_grad()
def propagate(
    block: nn.Module, chunks: list[Chunk], index: int, reuse: ActivationReuse | None = None, changed: str | None = None
) -> None:
    """Replace each chunk's hidden states by the block's output (the next block's input)."""
    outputs: dict[int, torch.Tensor] = {}

    def keep(k: int, out: torch.Tensor) -> None:
        if not torch.isfinite(out).all():
            raise RdquantError(
                f"non-finite (NaN/Inf) activations after block {index}: the model overflows on the "
                "calibration data in this dtype; load it in float32 or check the checkpoint"
            )
        outputs[k] = _park(out, chunks[k].hidden.device)

    _run_pass(block, chunks, reuse, keep, changed)
    for k, c in enumerate(chunks):
        c.hidden = outputs[k]


@torch.no_grad()
def discover_stages(
    block: nn.Module, linears: dict[str, nn.Linear], chunk: Chunk
) -> tuple[list[list[str]], dict[str, tuple[str, int]]]:
    """Run the block once on one sample and read its structure:
    stages - the linears in execution order, consecutive ones that share an input grouped;
    tails - for each submodule whose output is exactly one of its linears' output (alone, or first
    in a tuple whose other items are None), that linear and the number of Nones."""
    # Each linear's input tensor is kept (not just its address): a freed input's memory is soon
    # reused by a same-shaped later tensor (o_proj's input, then post_attention_layernorm's output),
    # and grouping by a reused address once merged o_proj with gate/up into one stage. The version
    # counter tells an input changed in place from the one an earlier linear saw.
    order: list[tuple[str, torch.Tensor, tuple]] = []
    outputs: dict[str, Any] = {}
    handles = []
    names = {id(m): n for n, m in block.named_modules() if n}

    def pre(name: str):
        def hook(module, args):
            if name not in outputs and all(o[0] != name for o in order):
                x = args[0]
                order.append((name, x, (x.data_ptr(), tuple(x.shape), x.stride(), x._version)))

        return hook

    def post(module, args, out):
        outputs.setdefault(names[id(module)], out)

    for name, lin in linears.items():
        handles.append(lin.register_forward_pre_hook(pre(name)))
    for m in block.modules():
        if id(m) in names:
            handles.append(m.register_forward_hook(post))
    try:
        small = Chunk(chunk.hidden[:1], _slice_kwargs(chunk.kwargs, chunk.hidden.shape[0]), chunk.device)
        _block_output(block, small)
    finally:
        for h in handles:
            h.remove()
    seen = {o[0] for o in order}
    if seen != set(linears):
        raise RdquantError(f"these linears never run in the block's forward: {', '.join(sorted(set(linears) - seen))}")
    stages: list[list[str]] = []
    last_key = None
    for name, _, key in order:
        if stages and key == last_key:
            stages[-1].append(name)
        else:
            stages.append([name])
        last_key = key
    tails: dict[str, tuple[str, int]] = {}
    for mname, out in outputs.items():
        if mname in linears:
            continue
        head, rest = (out[0], out[1:]) if isinstance(out, tuple) and out else (out, ())
        if any(r is not None for r in rest):
            continue
        for lname in linears:
            if lname.startswith(mname + ".") and outputs.get(lname) is head:
                tails[mname] = (lname, len(rest))
    return stages, tails


def _slice_kwargs(kwargs: dict[str, Any], batch: int) -> dict[str, Any]:
    """Keyword arguments for the first sample of a batch (tensors with a leading batch dim are cut)."""

    def cut(v):
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch and batch > 1:
            return v[:1]
        if isinstance(v, tuple):
            return tuple(cut(x) for x in v)
        return v

    return {k: cut(v) for k, v in kwargs.items()}


@torch.no_grad()
def stage_hessian(
    block: nn.Module,
    linears: dict[str, nn.Linear],
    stage: list[str],
    chunks: list[Chunk],
    label: str,
    reuse: ActivationReuse | None = None,
    changed: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, E[x]) of the stage's shared input, from forwards that stop where the stage's first linear
    starts (the stage's linears all take that same input)."""
    first = linears[stage[0]]
    acc = HessianAccumulator(first.in_features, device=first.weight.device)

    def collect_and_stop(module, args):
        if reuse:
            reuse.mark()
            reuse.record_input(stage[0], args[0])
        acc.add(args[0])
        raise _StopForward

    handle = first.register_forward_pre_hook(collect_and_stop)
    try:
        _run_pass(block, chunks, reuse, changed=changed)
    finally:
        handle.remove()
    acc.check_finite(label)
    return acc.H, acc.mean


def layer_log(name: str, method: str, part: Any, w: torch.Tensor, Q: torch.Tensor, H: torch.Tensor | None,
              notes: list[str], spec: dict | None = None) -> LayerLog:
    """A layer's log line: its grid, weight MSE and, with the Hessian, the proxy error of the result and
    of plain rounding onto the same grid (the 'before' of the method's error compensation)."""
    log = LayerLog(name, method, part.bits, part.group_size, tuple(w.shape), part.symmetric, spec=spec, notes=list(notes))
    log.weight_mse = float((w - Q).square().mean())
    if H is not None:  # an eighth of the rows at a time: the rounding's temporaries are [rows, in] fp32 each
        panels = row_panels(w.shape[0])
        try:
            grids = [part.rows(a, b) for a, b in panels]
        except (NotImplementedError, ValueError):  # a grid that cannot be cut there (codebooks, row clusters): whole
            panels, grids = [(0, w.shape[0])], [part]
        log.proxy_error = log.proxy_error_rtn = 0.0
        for (a, b), g in zip(panels, grids):
            log.proxy_error += proxy_error(w[a:b], Q[a:b], H)
            log.proxy_error_rtn += proxy_error(w[a:b], g.round_to_grid(w[a:b]).to(w.device), H)
    return log


def quantize_stage(
    block: nn.Module,
    linears: dict[str, nn.Linear],
    stage: list[str],
    H: torch.Tensor | None,
    cfg: CompressConfig,
    prefix: str,
    dtype: torch.dtype,
    method_state: Any = None,
    x_mean: torch.Tensor | None = None,
) -> list[LayerLog]:
    """Quantize the stage's linears jointly (they share H, so rows can be stacked) and swap in
    QuantLinear modules; returns one log line per linear. With cfg.bias_correction and the input
    mean, each layer's bias absorbs the mean output error (W - Q) E[x] (a bias is added if none)."""
    method = METHODS[cfg.method]
    t0 = time.perf_counter()
    weights = [linears[n].weight.data.to(torch.float32) for n in stage]
    for n, w in zip(stage, weights):
        if not torch.isfinite(w).all():
            raise RdquantError(f"{prefix}{n}.weight has NaN/Inf values; the checkpoint is broken")
    W = torch.cat(weights, dim=0) if len(weights) > 1 else weights[0]  # the methods leave W as it is
    parts = tuple((w.shape[0], linears[n].bias is not None) for n, w in zip(stage, weights))
    names = [prefix + n for n in stage]
    solve_cfg = _less_adapters(cfg, weights)
    bounds = torch.cumsum(torch.tensor([0] + [w.shape[0] for w in weights]), 0).tolist()
    split = lambda qw: qw if isinstance(qw, list) else [qw.rows(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    qw, notes = method.quantize(W, H, solve_cfg, method_state, parts, names)
    results = split(qw)
    adapters: list = [None] * len(stage)
    if cfg.lowrank != 0:  # SLiM's adapters on the solve's error, the base solved again against W - U D (rounds),
        # then the adapters re-fitted to the last base's error; --lowrank auto: the ranks CVXQ's plan chose
        h_diag = torch.diagonal(H) if H is not None else torch.ones(W.shape[1], device=W.device)
        ranks = [getattr(method_state, "ranks", {}).get(nm, 0) if cfg.lowrank == -1 else None for nm in names]
        fit = lambda: [fit_adapters(w, part.dequantize().to(w.device), h_diag, cfg, r)
                       for w, part, r in zip(weights, results, ranks)]
        adapters = fit()
        again = method.requantize or (lambda W_, H_, c, st, p, nm, first: method.quantize(W_, H_, c, st, p, nm))
        for _ in range(cfg.lowrank_rounds if any(a is not None for a in adapters) else 0):
            delta = torch.cat([a.delta().to(W.device) if a is not None else torch.zeros_like(w)
                               for a, w in zip(adapters, weights)])
            qw, notes2 = again(W - delta, H, solve_cfg, method_state, parts, names, results)
            results = split(qw)
            notes = notes + [m for m in notes2 if m not in notes]
            adapters = fit()
    seconds = (time.perf_counter() - t0) / len(stage)
    logs = []
    for n, w, part, lowrank in zip(stage, weights, results, adapters):
        lin = linears[n]
        correct = cfg.bias_correction and x_mean is not None
        bias = lin.bias.data if lin.bias is not None else torch.zeros(w.shape[0]) if correct else None
        q = QuantLinear.from_quantized(part, bias, dtype, lowrank)
        q.cache_dequantized = True  # the pipeline's later stages reuse it; cleared per block
        Q = (q.effective_weight() if lowrank is not None else q.dequantized_weight()).to(torch.float32)
        if correct:  # the mean output error, moved into the bias
            q.bias.data += ((w - Q) @ x_mean.to(w.device)).to(q.bias.dtype)
        log = layer_log(prefix + n, cfg.method, part, w, Q, H, notes, q.spec)
        log.seconds = seconds
        logs.append(log)
        set_submodule(block, n, q)
        linears[n] = q  # type: ignore[assignment]
    return logs


def _less_adapters(cfg: CompressConfig, weights: list[torch.Tensor]) -> CompressConfig:
    """The config a stage is solved with: CLAQ's per-layer --target-bits lowered by the adapters' share
    (their bytes count in the all-in size; CVXQ's plan takes them out of its budget)."""
    if cfg.lowrank <= 0 or cfg.method != "claq" or cfg.target_bits is None:
        return cfg
    n = sum(w.numel() for w in weights)
    share = 8 * sum(adapter_nbytes(w.shape[1], w.shape[0], cfg) for w in weights) / n
    if cfg.target_bits - share < 0.5:
        raise RdquantError(f"--target-bits {cfg.target_bits} leaves {cfg.target_bits - share:.2f} bits/weight for the "
                           f"codes after the adapters' {share:.2f}: raise the target or lower --lowrank")
    return cfg.replace(target_bits=cfg.target_bits - share)


class Checkpoint:
    """Finished blocks of a run: <dir>/progress.json + block_NNNN.safetensors/.json (+ the inputs of a
    later block, for resuming). With a streamed source the block files hold every tensor of the block
    and are what the artifact is assembled from (`BlockFiles`)."""

    def __init__(self, path: Path, cfg: CompressConfig, model_id: str) -> None:
        self.path = path
        self.key = {"config": cfg.to_dict(), "model": model_id}
        self._inputs_saved_at = time.monotonic()
        self.inputs_block: int | None = None  # the block whose inputs inputs.safetensors holds

    def start(self, resume: bool) -> int:
        """Blocks already done (0 unless resuming a matching checkpoint); prepares the directory."""
        prog = self.path / PROGRESS
        self.method_state: dict[str, Any] | None = None
        if resume and prog.is_file():
            state = json.loads(prog.read_text())
            if state.get("key") != self.key:
                raise RdquantError(
                    f"--resume: the checkpoint in {self.path} was made with other settings or another model"
                )
            ms = self.path / METHOD_STATE
            self.method_state = state.get("method_state") or (json.loads(ms.read_text()) if ms.is_file() else None)
            self.inputs_block = state.get("inputs_block", state["blocks_done"])  # older runs saved them every block
            return int(state["blocks_done"])
        if resume:
            raise RdquantError(f"--resume: no checkpoint of an interrupted run at {self.path}")
        if prog.is_file():
            raise RdquantError(f"{self.path} holds an interrupted run's checkpoint: resume it (--resume) or "
                               "discard it (--overwrite)")
        remove_owned(self.path)  # an empty or block-less checkpoint of ours; refuses anything else
        self.path.mkdir(parents=True)
        (self.path / CHECKPOINT_MARKER).write_text(json.dumps({"producer": "rdquant", "model": self.key["model"]}))
        return 0

    def save_method_state(self, method_state: dict | None) -> None:
        """A method's run-wide state that stays as prepared (cvxq: the allocation), written once beside the
        progress: at 8B it is tens of MB of JSON, too much to rewrite with every block."""
        if method_state is not None:
            _atomic_save(json.dumps(method_state), self.path / METHOD_STATE)

    def save_block(
        self,
        i: int,
        block: nn.Module,
        logs: list[LayerLog],
        chunks: list[Chunk] | None = None,
        full: bool = False,
        method_state: dict | None = None,
    ) -> None:
        """Save block i's quantized tensors (`full`: every tensor of the block) and log, then, when it
        is small or a while since the last time, the inputs of block i+1 (so a resume starts from
        those activations instead of recomputing them from block 0), then the progress."""
        if full:
            tensors = {k: v.contiguous() for k, v in block.state_dict().items()}
        else:
            tensors = {f"{n}.{k}": v.contiguous() for n, m in block.named_modules() if isinstance(m, QuantLinear)
                       for k, v in m.state_dict().items()}
        _atomic_save(tensors, self.path / f"block_{i:04d}.safetensors")
        quantized = {n: m.table_entry() for n, m in block.named_modules() if isinstance(m, QuantLinear)}
        (self.path / f"block_{i:04d}.json").write_text(json.dumps({"logs": [asdict(l) for l in logs],
                                                                    "quantized": quantized}))
        state = {"key": self.key, "blocks_done": i + 1, "inputs_block": self.inputs_block}
        if method_state is not None:  # a state that changes with every block, saved with the progress
            state["method_state"] = method_state
        if chunks:
            nbytes = sum(_nbytes(c.hidden) for c in chunks)
            if nbytes <= SMALL_INPUTS or time.monotonic() - self._inputs_saved_at >= INPUTS_EVERY_S:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()  # parked activations are copied asynchronously
                _atomic_save({f"chunk_{k:05d}": c.hidden.detach().cpu().contiguous() for k, c in enumerate(chunks)},
                             self.path / "inputs.safetensors")
                state["inputs_block"] = self.inputs_block = i + 1
                self._inputs_saved_at = time.monotonic()
        _atomic_save(json.dumps(state), self.path / PROGRESS)

    def _block_record(self, i: int) -> dict[str, Any]:
        rec = json.loads((self.path / f"block_{i:04d}.json").read_text())
        return {"logs": rec, "quantized": None} if isinstance(rec, list) else rec

    def load_logs(self, i: int) -> list[LayerLog]:
        return [LayerLog(**{**l, "shape": tuple(l["shape"])}) for l in self._block_record(i)["logs"]]

    def load_block(self, i: int, block: nn.Module, cfg: CompressConfig, dtype: torch.dtype, prefix: str) -> list[LayerLog]:
        """Swap block i's linears for the saved QuantLinear modules; returns its logs."""
        tensors = load_file(self.path / f"block_{i:04d}.safetensors")
        logs = self.load_logs(i)
        by_name = {l.name: l for l in logs}
        device = next(block.parameters()).device
        for n, lin in block_linears(block, cfg.skip).items():
            log = by_name[prefix + n]
            q = QuantLinear(
                lin.in_features, lin.out_features, log.bits, log.group_size, log.symmetric,
                lin.bias is not None or cfg.bias_correction, dtype, spec=log.spec,
            )
            q.load_state_dict({k.split(".")[-1]: v for k, v in tensors.items() if k.rpartition(".")[0] == n})
            set_submodule(block, n, q.to(device))
        return logs

    def load_inputs(self, chunks: list[Chunk]) -> int | None:
        """Restore saved block inputs into `chunks`: the index of the block they are the inputs of,
        None if there are none."""
        f = self.path / "inputs.safetensors"
        if not f.is_file():
            return None
        saved = load_file(f)
        if len(saved) != len(chunks):
            raise RdquantError(f"--resume: the checkpoint in {self.path} has inputs for another calibration set")
        for k, c in enumerate(chunks):
            c.hidden = _park(saved[f"chunk_{k:05d}"].to(c.device or "cpu"), c.hidden.device)
        return self.inputs_block if self.inputs_block is not None else 0

    def block_files(self, blocks_name: str, n_blocks: int) -> "BlockFiles":
        return BlockFiles(self.path, blocks_name, n_blocks, self)

    def remove(self) -> None:
        remove_owned(self.path)


def _atomic_save(data: "dict[str, torch.Tensor] | str", path: Path) -> None:
    """Write tensors (safetensors) or text to `path` through a temporary file: a reader (a resume)
    never sees half of it."""
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(data, str):
        tmp.write_text(data)
    else:
        save_file(data, tmp)
    tmp.replace(path)


class BlockFiles(Mapping):
    """Every block's tensors (full names) as saved by a streamed run, read from disk one at a time:
    what the artifact writer streams from (`nbytes_of` sizes a tensor without reading it)."""

    def __init__(self, path: Path, blocks_name: str, n_blocks: int, ckpt: Checkpoint) -> None:
        from safetensors import safe_open

        self._where: dict[str, tuple[Path, str]] = {}
        self._nbytes: dict[str, int] = {}
        self._dtype: dict[str, torch.dtype] = {}
        self.quantized: dict[str, Any] = {}
        for i in range(n_blocks):
            f = path / f"block_{i:04d}.safetensors"
            prefix = f"{blocks_name}.{i}."
            with safe_open(f, "pt") as fh:
                for k in fh.keys():
                    sl = fh.get_slice(k)
                    shape, dt = sl.get_shape(), sl.get_dtype()
                    dtype = _SAFETENSORS_DTYPES[dt]
                    self._where[prefix + k] = (f, k)
                    self._dtype[prefix + k] = dtype
                    self._nbytes[prefix + k] = math.prod(shape) * dtype.itemsize
            for n, entry in (ckpt._block_record(i)["quantized"] or {}).items():
                self.quantized[prefix + n] = entry

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        f, k = self._where[name]
        with safe_open(f, "pt") as fh:
            return fh.get_tensor(k)

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def nbytes_of(self, name: str) -> int:
        return self._nbytes[name]

    def dtype_of(self, name: str) -> torch.dtype:
        return self._dtype[name]


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def run_pipeline(*args, **kwargs) -> PipelineState:
    """Quantize every decoder-block linear of `model` in place (nn.Linear -> QuantLinear)."""
    with retain_freed_memory():
        return _run_pipeline(*args, **kwargs)


def activation_home(cfg: CompressConfig, n_windows: int, seqlen: int, hidden: int, dtype: torch.dtype,
                    fixed_bytes: int) -> torch.device:
    """Where calibration activations wait between passes, checked before any work: the device when a
    block's inputs and outputs (2 copies; 3 with block tuning's targets) fit beside `fixed_bytes` (one block, its Hessians, a batch's
    intermediates) in its free memory (cfg.activations = auto), else pinned CPU memory. A run that
    cannot fit either way is refused here with the flag that makes it fit."""
    device = torch.device(cfg.device)
    copies = 3 if cfg.tunes("block") else 2  # block tuning keeps the float outputs too
    need = copies * n_windows * seqlen * hidden * torch.finfo(dtype).bits // 8
    gib = lambda b: f"{b / 2**30:.1f} GiB"
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if fixed_bytes > 0.9 * free:
            raise RdquantError(
                f"a block step needs about {gib(fixed_bytes)} of GPU memory (the block, its largest Hessians, one "
                f"batch of {cfg.batch_size} windows) and {device} has {gib(free)} free: lower --batch-size "
                f"or --calib-seqlen, or use a GPU with more memory")
        if cfg.activations != "cpu" and need + fixed_bytes <= 0.9 * free:
            return device
        if cfg.activations == "device":
            raise RdquantError(f"the calibration activations ({gib(need)}, in and out of a block) do not fit on "
                               f"{device} beside a block step ({gib(fixed_bytes)}; {gib(free)} free): use "
                               "--activations auto (pinned CPU memory) or fewer --calib-samples")
        home = torch.device("cpu")
    else:
        home = device
    try:
        import psutil

        avail = psutil.virtual_memory().available
    except ImportError:  # pragma: no cover - psutil is a dependency
        return home
    if need > 0.9 * avail:
        raise RdquantError(f"the calibration activations ({gib(need)}, in and out of a block) do not fit in the "
                           f"{gib(avail)} of host memory available: lower --calib-samples or --calib-seqlen")
    return home


def reuse_activations_on(cfg: CompressConfig, device: torch.device, home: torch.device) -> bool:
    """Whether stages reuse submodule outputs (ActivationReuse): as configured, except on a GPU whose
    activations are parked on the host (the low-memory setting), where recomputing a submodule is as fast
    as keeping its output (8B shape, 2 layers, batch 4, H100: 10.9 s without reuse, 11.5 s with, and
    1.4 GiB less GPU memory)."""
    return cfg.reuse_activations and not (device.type == "cuda" and home.type == "cpu")


def _run_pipeline(
    model: nn.Module | BlockSource,
    cfg: CompressConfig,
    calib_ids: torch.Tensor | None,
    checkpoint: Checkpoint | None = None,
    resume: bool = False,
    progress: bool = True,
    after_block: Callable[[int], None] | None = None,
) -> PipelineState:
    source = as_source(model)
    model = source.model
    device = torch.device(cfg.device)
    dtype = next(model.parameters()).dtype
    blocks_name, blocks = find_blocks(model)
    if source.streamed and checkpoint is None:
        raise RdquantError("a streamed block source writes every finished block to disk: pass a checkpoint "
                           "directory (compress(..., checkpoint_dir=...))")
    method = METHODS[cfg.method]
    state = PipelineState()
    start = checkpoint.start(resume) if checkpoint else 0
    for i in range(start):
        if cfg.kv_bits and not source.streamed:  # the saved block holds its key shifts
            _attach_kv(blocks[i], cfg)
        if source.streamed:
            state.logs += checkpoint.load_logs(i)  # type: ignore[union-attr]
        else:
            state.logs += checkpoint.load_block(i, blocks[i], cfg, dtype, f"{blocks_name}.{i}.")  # type: ignore[union-attr]
    home = device
    if method.needs_hessian and calib_ids is not None:  # refuse a run that cannot fit before any work
        hidden = int(getattr(model.config, "hidden_size", 0)) or next(blocks[0].parameters()).shape[-1]
        home = activation_home(cfg, calib_ids.shape[0], calib_ids.shape[1], hidden, dtype,
                               fixed_bytes(source, cfg, calib_ids.shape[1]))
    method_state = None
    if method.prepare is not None:
        saved = checkpoint.method_state if checkpoint and start else None
        if saved is not None and method.from_dict is not None:
            method_state = method.from_dict(saved)
        else:
            method_state = method.prepare(source, calib_ids, cfg, progress)
            if checkpoint and not method.state_changes:
                checkpoint.save_method_state(state_to_dict(method_state))
    state.method_state = method_state

    chunks: list[Chunk] = []
    if method.needs_hessian:
        if calib_ids is None:
            raise RdquantError(f"method {cfg.method} needs calibration data")
        chunks = capture_block_inputs(model, blocks, calib_ids, cfg.batch_size, device, home)
        first = checkpoint.load_inputs(chunks) if start else 0  # type: ignore[union-attr]
        for i in range(first or 0, start):  # recompute the inputs of block `start` from the saved ones
            block = source.load(i, device)
            if source.streamed:
                if cfg.kv_bits:
                    _attach_kv(block, cfg)
                checkpoint.load_block(i, block, cfg, dtype, f"{blocks_name}.{i}.")  # type: ignore[union-attr]
            propagate(block, chunks, i)
            source.release(i)

    stages: list[list[str]] | None = None
    tails: dict[str, tuple[str, int]] = {}
    what = (f"{cfg.target_coded_bits} coded bits" if cfg.method == "ecsq"
            else f"{method_state.planned_bits:.3f} {'coded ' if cfg.cvxq_rate == 'coded' else ''}bits/weight" if cfg.method == "cvxq"
            else f"{cfg.target_bits} bits/weight" if cfg.target_bits is not None else f"{cfg.bits}-bit")
    bar = tqdm(range(start, len(blocks)), desc=f"{cfg.method} {what}", unit="block", disable=not progress,
               initial=start, total=len(blocks))
    # reused activations: unlimited in host memory; on a GPU half the calibration activations' size, so a
    # block step stays within ~2.5x the activations plus the block, its Hessians and one batch's intermediates
    budget = float("inf") if device.type == "cpu" else 0.5 * sum(_nbytes(c.hidden) for c in chunks)
    reuse_on = reuse_activations_on(cfg, device, home)
    for i in bar:
        block = source.load(i, device)
        prefix = f"{blocks_name}.{i}."
        if cfg.kv_bits:  # on the float block, before its Hessians: the folds change q/k/v/o_proj
            kv_calibrate_block(block, chunks, cfg)
            if cfg.kv_crr:
                kv_crr_block(block, source, i, len(blocks), chunks, cfg, device)
        linears = block_linears(block, cfg.skip)
        logs: list[LayerLog] = []
        if method.needs_hessian:
            if stages is None or sorted(n for s in stages for n in s) != sorted(linears):
                stages, tails = discover_stages(block, linears, chunks[0])
            targets = block_targets(block, chunks) if cfg.tunes("block") else None  # the float block's outputs
            reuse = ActivationReuse(block, tails, budget) if reuse_on else None
            try:
                changed = None
                for stage in stages:
                    H, x_mean = stage_hessian(block, linears, stage, chunks, prefix + stage[0], reuse, changed)
                    changed = stage[0]
                    logs += quantize_stage(block, linears, stage, H, cfg, prefix, dtype, method_state, x_mean)
                    del H
                if targets is not None:  # every linear moved: reuse can serve nothing from here on
                    from .tune import tune_block

                    if reuse:
                        reuse.bypass = True
                    state.add_tuning(tune_block(block, lambda k: _block_output(block, chunks[k]), targets,
                                                   cfg.tune_steps, cfg.tune_lr, cfg.seed + i, cfg.scale_bits),
                                     cfg.tune_steps)
                    del targets
                elif reuse and i == start:  # check once that reuse is exact for this architecture
                    reuse.bypass = True
                    reference = _block_output(block, chunks[0])
                    reuse.bypass = False
                propagate(block, chunks, i, reuse, changed)
                checked = reuse and i == start and not cfg.tunes("block")
                if checked and not torch.equal(reference.to(chunks[0].hidden.device), chunks[0].hidden):
                    raise RdquantError(
                        "activation reuse does not reproduce this architecture's block outputs exactly "
                        "(a module changes its output in place?); rerun with reuse_activations: false"
                    )
            finally:
                if reuse:
                    reuse.close()
        else:
            for n in list(linears):
                logs += quantize_stage(block, linears, [n], None, cfg, prefix, dtype, method_state)
        for m in block.modules():
            if isinstance(m, QuantLinear):
                m.cache_dequantized = False
                m.clear_cache()
        state.logs += logs
        state.blocks_done = i + 1
        if checkpoint:
            checkpoint.save_block(i, block, logs, chunks, full=source.streamed,
                                  method_state=state_to_dict(method_state) if method.state_changes else None)
        source.release(i)
        if after_block:
            after_block(i)
    if cfg.embed_bits != 16:  # the embedding and head, solved on the last block's outputs
        from .sensitivity import final_norm
        from .vocab import quantize_vocab

        try:
            norm = final_norm(model)
        except RdquantError:
            norm = None
        state.logs += quantize_vocab(model, cfg, [c.hidden for c in chunks] if chunks and norm is not None else None,
                                     dtype, norm, getattr(method_state, "vocab", None))
    return state


def fixed_bytes(source: BlockSource, cfg: CompressConfig, seqlen: int) -> int:
    """GPU bytes a block step needs besides the parked activations: the block, its largest stage's
    Hessian (the accumulator, the solver's in-place factor, and as much again for the weight's fp32
    copies and the solvers' workspaces: 3 fp32 [in, in] matrices) and one batch's intermediates (a few
    tensors of the block's widest layer)."""
    _, blocks = source.blocks
    lin = [m for m in blocks[0].modules() if isinstance(m, (nn.Linear, QuantLinear))]
    widest_in = max(m.in_features for m in lin)
    widest_out = max(m.out_features for m in lin)
    elem = next(source.model.parameters()).element_size()
    return source.block_bytes() + 3 * 4 * widest_in**2 + 4 * cfg.batch_size * seqlen * widest_out * max(elem, 4)
