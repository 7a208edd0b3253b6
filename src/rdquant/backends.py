"""Runtime backends, chosen per layer at load: `reference` (dequantize on every call: exact, least
memory), `cached` (dequantize once and keep it: costs the dense weight's memory) and the kernels a
layout has: `triton` (fused unpack-dequantize-matmul on the GPU from the packed bytes: every layout)
and `int4-cpu` (torch's CPU int4 kernel: 4-bit affine layers). `auto` takes the fastest that exists for
each layer on the model's device."""

from __future__ import annotations

import functools
import os

import torch
from torch import nn

from .errors import RdquantError
from .runtime import QuantLinear

BACKENDS = ("auto", "reference", "cached", "triton", "int4-cpu")
KERNELS = ("triton", "int4-cpu")  # fastest first
# kernels whose outputs keep greedy generations identical to `reference` (fp32 products of the same
# values). int4-cpu multiplies bfloat16 activations by a bfloat16 grid: ~3e-3 relative error, and the
# default model's greedy text drifts from the reference after 20-30 tokens on some prompts
EXACT = {"triton": True, "int4-cpu": False}
CACHE_SHARE = 0.5  # `auto` caches dequantized weights while they take at most this share of free memory


@functools.cache
def triton_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def kernel_runs_on(backend: str, device: torch.device) -> bool:
    """Whether `backend`'s kernels can run on `device` here (triton: CUDA; on the CPU only under
    Triton's interpreter, TRITON_INTERPRET=1, which tests use)."""
    if backend == "triton":
        return triton_available() and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
    if backend == "int4-cpu":
        from .kernels import int4_cpu

        return device.type == "cpu" and int4_cpu.available()
    return False


def fast_on(backend: str, device: torch.device) -> bool:
    """Whether `auto` may take this kernel on `device` (Triton's CPU interpreter is for tests)."""
    return device.type == "cuda" if backend == "triton" else True


def available_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on `device` (host: what the OS calls available)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def layer_options(m: QuantLinear, device: torch.device, explicit: bool = False) -> list[str]:
    """The backends this layer can use on `device`, fastest first (Triton on the CPU only when asked
    for by name: the interpreter is for tests, not speed)."""
    kernels = [k for k in KERNELS if m.layout.kernel_supports(m.layer, k) and kernel_runs_on(k, device)
               and (explicit or fast_on(k, device))]
    return kernels + ["cached", "reference"]


def set_backend(model: nn.Module, backend: str = "auto", cache: bool = True) -> dict[str, int]:
    """Give every QuantLinear of `model` a backend; returns how many layers use each. `auto`: an exact
    kernel where the layer's layout has one that runs here, else `cached` while the dequantized weights
    fit in CACHE_SHARE of the free memory, else an inexact kernel that fits the layer (int4-cpu: faster
    than `reference` and as small), else `reference`. A kernel named explicitly runs every decoder
    linear (or is refused); the embedding and head take `cached` where that kernel does not fit them.
    With cache=False (under a memory budget) no layer keeps a dequantized copy: never `cached`."""
    if backend not in BACKENDS:
        raise RdquantError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    counts: dict[str, int] = {}
    budget = None
    for m in layers:
        device = m.device
        options = layer_options(m, device, explicit=backend != "auto")
        if not cache:
            options = [k for k in options if k != "cached"]
        if backend == "auto":
            inexact = [k for k in options if k in KERNELS and not EXACT[k]]
            choice = next(k for k in options if k not in inexact)
            if choice == "cached":
                need = m.in_features * m.out_features * torch.empty(0, dtype=m.compute_dtype).element_size()
                budget = CACHE_SHARE * available_memory(device) if budget is None else budget
                choice = "cached" if need <= budget else (inexact + ["reference"])[0]
                budget -= need if choice == "cached" else 0
        elif backend in options:
            choice = backend
        elif m.kind != "linear" and backend in KERNELS:  # the embedding / head: exact, where no kernel fits it
            choice = "cached" if "cached" in options else "reference"
        else:
            raise RdquantError(f"backend {backend} cannot run {m.layout.name} layers with {m.bits}-bit codes on "
                               f"{device.type} here; use --backend auto")
        m.set_backend(choice)
        counts[choice] = counts.get(choice, 0) + 1
    return counts


def describe(counts: dict[str, int]) -> str:
    """'cached (210 layers)' or 'triton (180 layers), reference (30 layers)'."""
    return ", ".join(f"{k} ({v} layers)" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])) or "no quantized layers"
