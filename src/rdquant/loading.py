"""`load(dir)`: an artifact back into a transformers model with QuantLinear modules.
Runtime side: reads the container and builds modules; never imports the algorithms."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .artifact import available_cores, check_sidecars, is_artifact, read_manifest, read_tensors
from .errors import ArtifactError, RdquantError, first_line
from .models import set_submodule
from .backends import set_backend
from .runtime import QUANT_BUFFERS, QuantEmbedding, QuantLinear

if TYPE_CHECKING:
    from .stream import Storage

try:  # transformers >= 5
    from transformers.initialization import no_init_weights
except ImportError:  # transformers 4.x
    from transformers.modeling_utils import no_init_weights


def load(
    path: str | os.PathLike,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    verify: bool = True,
    cache_dequantized: bool = False,
    lazy: bool = False,
    backend: str = "auto",
    max_memory: str | int | None = None,
    storage: "Storage | None" = None,
) -> nn.Module:
    """Load an artifact as a transformers causal LM whose quantized linears are QuantLinear; given
    anything else `--model` accepts (an alias such as "smollm2-135m", an HF directory, a .gguf file),
    load that original model instead (`load_original`).

    Every tensor's sha256 is checked unless verify=False; a damaged artifact raises ArtifactError
    naming the tensor. `backend` picks how each quantized layer computes (backends.py): `auto` (the
    fastest that exists for the layer on `device`), `reference`, `cached` or `triton`;
    `cache_dequantized=True` is the older spelling of `backend="cached"`. With `lazy`, a quantized
    layer's tensors are read, checked and decoded only when it is first used.

    `max_memory` ("200MB", bytes) bounds the memory the model's tensors take on `device`: decoder
    blocks that do not fit stay in the artifact and every forward streams them (stream.py; each block
    is checked on its first read); `storage` simulates slower storage for benchmarks.
    """
    from .stream import not_streamable, parse_budget

    budget = parse_budget(max_memory)
    if not is_artifact(path):
        if budget is not None:
            raise not_streamable(path)
        return load_original(path, device=device, dtype=dtype)
    backend = "cached" if cache_dequantized else backend
    if budget is not None and backend not in ("auto", "reference", "triton"):
        raise RdquantError(f"--backend {backend} keeps a second copy of the weights, which --max-memory does not "
                           "allow: use --backend auto, reference or triton")
    try:
        return _load_artifact(Path(path), device, dtype, verify, backend, lazy, budget, storage)
    except RdquantError:
        raise
    except Exception as e:  # anything a damaged file can make transformers or safetensors raise
        first = first_line(e)
        raise ArtifactError(f"{path} could not be loaded ({type(e).__name__}: {first}); the artifact is damaged or "
                            "was written by another version") from e


def load_original(spec: str | os.PathLike, device: str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """The original (uncompressed) model named the way `--model` names it: alias, HF directory or .gguf."""
    from .models import load_model

    return load_model(spec, dtype=dtype, device=device)[0]


def _load_artifact(path: Path, device: str, dtype: torch.dtype, verify: bool, backend: str,
                   lazy: bool, budget: int | None = None, storage: "Storage | None" = None) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .stream import BlockStreamer, block_of, block_prefix, make_plan

    manifest = read_manifest(path)
    if verify:
        check_sidecars(path, manifest, ["config.json", "generation_config.json"])
    layer_keys = {
        name: [k for k in (f"{name}.{s}" for s in QUANT_BUFFERS) if k in manifest["tensors"]]
        for name in manifest["quantized"]
    }
    # lazily read: decoder linears (a vocabulary matrix may be shared by two modules: read at once)
    lazy_layers = {n for n, info in manifest["quantized"].items() if info.get("kind", "linear") == "linear"}
    deferred = {k for n, keys in layer_keys.items() if n in lazy_layers for k in keys} if lazy else set()
    plan = prefix = None
    if budget is not None:  # blocks beyond the budget are never read here: the streamer reads them per forward
        prefix = block_prefix(manifest)
        plan = make_plan(manifest, budget, dtype, prefix)
        streamed = set(plan.streamed)
        deferred = {k for k in manifest["tensors"] if block_of(k, prefix) in streamed}
    names = [k for k in manifest["tensors"] if k not in deferred]
    quant_keys = {f"{name}.{k}" for name in manifest["quantized"] for k in QUANT_BUFFERS}

    def read() -> dict[str, torch.Tensor]:  # in a worker thread, so that it overlaps building the skeleton
        # one reader fewer than cores: this thread builds the skeleton meanwhile (on 2 cores, 2 readers
        # made coded loads ~12% slower, packed ones no faster; docs/notes/benchmarks-lab.md §3)
        _, t = read_tensors(path, verify=verify, names=names, workers=max(1, available_cores() - 1))
        return {k: v if k in quant_keys or not v.is_floating_point() else v.to(dtype) for k, v in t.items()}

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:
        reading = pool.submit(read)
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ArtifactError(f"{path}/config.json is missing or invalid: {e}") from e
        with no_init_weights(), init_empty_weights():  # parameters on the meta device: every one is assigned below
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        for name, info in manifest["quantized"].items():
            if info.get("kind") == "embedding":
                q = QuantEmbedding.from_manifest(info, dtype)
                if q.tied_head:  # the head holds the same stored tensors (tied below)
                    head = QuantLinear.from_manifest({**info, "bias": False, "kind": "head"}, dtype)
                    set_submodule(model, q.tied_head, head)
            else:
                q = QuantLinear.from_manifest(info, dtype)
            set_submodule(model, name, q)
            if lazy and budget is None and name in lazy_layers:
                q.set_loader(functools.partial(_materialize, path, layer_keys[name], verify))
        state = reading.result()
    if "kv_cache" in manifest:  # the key-shift buffers the state fills; generation uses QuantizedKVCache
        from .kvcache import KVSpec, attach

        try:
            attach(model, KVSpec(**manifest["kv_cache"]))
        except (TypeError, RdquantError) as e:
            raise ArtifactError(f"{path}: the manifest's kv_cache entry is invalid ({first_line(e)})") from e
    # the read tensors become the model's (no copy); shapes are checked by load_state_dict
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if k not in deferred]
    if unexpected:
        raise ArtifactError(f"tensor {unexpected[0]} in {path} does not belong to a {config.model_type} model")
    tied = manifest.get("tied", {})
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    for alias, target in tied.items():  # one tensor in the original, stored once: one Parameter again
        owner, _, leaf = alias.rpartition(".")
        if alias in params and target in params:  # (a skeleton built without init is not tied yet)
            setattr(model.get_submodule(owner), leaf, params[target])
        elif alias in buffers and target in buffers:  # a tied embedding / head pair's stored tensors
            model.get_submodule(owner)._buffers[leaf] = buffers[target]
    missing = [k for k in missing if k not in tied]
    if missing:
        raise ArtifactError(f"tensor {missing[0]} is missing from {path}")
    if plan is not None and plan.streamed:
        streamer = BlockStreamer(path, manifest, model, plan, prefix, dtype, torch.device(device), storage, verify)
        streamer.placeholders()  # before the move: the streamed blocks' skeleton tensors never reach the device
        model._rdquant_streamer = streamer
    model.eval().to(device)
    set_backend(model, backend, cache=budget is None)
    if plan is not None:
        model._rdquant_plan = plan
        for b in plan.streamed:  # dequantized per call from the tensors of the moment
            for m in model.get_submodule(prefix)[b].modules():
                if isinstance(m, QuantLinear):
                    m.set_backend("reference")
    return model


def _materialize(path: Path, keys: list[str], verify: bool, module: QuantLinear) -> None:
    """Read, check and decode one layer's tensors into its (lazy) QuantLinear."""
    _, t = read_tensors(path, verify=verify, names=keys)
    try:
        module.set_tensors({k.rpartition(".")[2]: v for k, v in t.items()})
    except Exception as e:  # tensors that do not fit the manifest's entry of their layer
        layer = keys[0].rpartition(".")[0] if keys else "?"
        raise ArtifactError(f"layer {layer} of {path} could not be loaded ({type(e).__name__}: {first_line(e)}); "
                            "the artifact is damaged or was written by another version") from e


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer of an artifact, or of anything `--model` accepts."""
    from transformers import AutoTokenizer

    if not is_artifact(path):
        from .models import load_tokenizer_of, resolve_model

        return load_tokenizer_of(resolve_model(path))
    check_sidecars(path, read_manifest(path), ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                               "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model"])
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
        first = first_line(e)
        raise ArtifactError(f"the tokenizer files in {path} could not be read ({first}); the artifact is damaged") from e
