"""Block sources: where the pipeline reads decoder blocks from, one block in memory at a time.

A source holds a model *skeleton*: everything outside the decoder blocks (embedding, final norm,
head, rotary tables) is real, and the blocks may be parameter-less (on the meta device) until the
pipeline asks for one. Three kinds:
  - `InMemoryBlocks`: a transformers model already in memory (the blocks move to the device and back);
  - `LazyBlocks`: an HF directory of safetensors shards; a block's tensors are read when it is loaded
    and dropped when it is released, so a 70B checkpoint never sits in host memory;
  - `SyntheticBlocks`: random weights materialised per block from a config and a seed, so a
    70B-shaped run needs no checkpoint on disk (bench/scale.py).
A streamed source (`streamed = True`) releases each finished block to meta: the pipeline then writes
the block's tensors to disk before releasing it, and the artifact is assembled from those files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import RdquantError
from .models import find_blocks


class BlockSource:
    """The model skeleton plus `load(i, device)` / `release(i)` of decoder block i."""

    model: nn.Module
    streamed: bool = False

    @property
    def blocks(self) -> tuple[str, nn.ModuleList]:
        return find_blocks(self.model)

    def __len__(self) -> int:
        return len(self.blocks[1])

    def load(self, i: int, device: torch.device | str) -> nn.Module:  # pragma: no cover - interface
        raise NotImplementedError

    def release(self, i: int) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def block_bytes(self) -> int:
        """Bytes of one block's parameters in the model's dtype (the largest block)."""
        _, blocks = self.blocks
        return max(sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks)


class InMemoryBlocks(BlockSource):
    """A model in memory: blocks move to the compute device and back to the CPU afterwards."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def load(self, i: int, device: torch.device | str) -> nn.Module:
        _, blocks = self.blocks
        blocks[i] = blocks[i].to(device)
        return blocks[i]

    def release(self, i: int) -> None:
        _, blocks = self.blocks
        blocks[i] = blocks[i].to("cpu")


def _skeleton(config: Any, dtype: torch.dtype) -> nn.Module:
    """The causal LM of `config` with every parameter on meta (buffers such as rotary tables real)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter or buffer `name` (dotted, relative to module) by `value`."""
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value


def _meta_names(module: nn.Module) -> list[str]:
    return [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]


class StreamedBlocks(BlockSource):
    """A source whose blocks are materialised on load and dropped (to meta, quantized buffers
    included) on release: only the current block is ever in memory."""

    streamed = True

    def _block_prefix(self) -> str:
        """'model.layers.': what names every block tensor (set once the skeleton exists)."""
        return self.blocks[0] + "."

    def release(self, i: int) -> None:
        self.blocks[1][i].to("meta")


class LazyBlocks(StreamedBlocks):
    """An HF directory of safetensors files, read a block at a time (tensors are never all in memory)."""

    def __init__(self, path: str | Path, dtype: torch.dtype | None = torch.float32) -> None:
        """`dtype` None: the checkpoint's own dtype when it is 16-bit (a GPU run), else float32."""
        from transformers import AutoConfig

        self.path = Path(path)
        self.files = self._index()
        config = AutoConfig.from_pretrained(self.path, local_files_only=True)
        self.stored_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if dtype is None:
            dtype = self.stored_dtype if self.stored_dtype in (torch.float16, torch.bfloat16) else torch.float32
        self.dtype = dtype
        self.model = _skeleton(config, dtype)
        self.prefix = self._block_prefix()
        outside = [n for n in _meta_names(self.model) if not self._in_block(n)]
        self._read_into(self.model, outside, "", "cpu")
        if hasattr(self.model, "tie_weights"):
            self.model.tie_weights()
        missing = [n for n in _meta_names(self.model) if not self._in_block(n)]
        missing += [n for n in _meta_names(self.model) if self._in_block(n) and n not in self.files]
        if missing:  # checked from the names alone, before any block is read
            raise RdquantError(f"{self.path}: tensor {missing[0]} is not in its safetensors files (a damaged or "
                               "renamed checkpoint); load it in memory instead")

    def _in_block(self, name: str) -> bool:
        return name.startswith(self.prefix)

    def _index(self) -> dict[str, Path]:
        """tensor name -> the safetensors file holding it."""
        from safetensors import safe_open

        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return {n: self.path / f for n, f in weight_map.items()}
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise RdquantError(f"{self.path} has no .safetensors files: a lazily read model needs safetensors")
        out: dict[str, Path] = {}
        for f in files:
            with safe_open(f, "pt") as fh:
                out.update({k: f for k in fh.keys()})
        return out

    def _read_into(self, module: nn.Module, names: list[str], prefix: str, device: torch.device | str) -> None:
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for n in names:
            full = prefix + n
            if full in self.files:
                by_file.setdefault(self.files[full], []).append(n)
        for f, ns in by_file.items():
            with safe_open(f, "pt", device=str(device)) as fh:
                for n in ns:
                    t = fh.get_tensor(prefix + n)
                    _set_tensor(module, n, t.to(self.dtype) if t.is_floating_point() else t)

    def load(self, i: int, device: torch.device | str) -> nn.Module:
        _, blocks = self.blocks
        block = blocks[i]
        names = _meta_names(block)
        self._read_into(block, names, f"{self.prefix}{i}.", device)
        left = _meta_names(block)
        if left:
            raise RdquantError(f"{self.path}: tensor {self.prefix}{i}.{left[0]} is not in its safetensors files")
        return block.to(device)


class SyntheticBlocks(StreamedBlocks):
    """Random weights from a config and a seed, materialised per block on the device it is loaded on
    (the same block i always gets the same weights on one device kind). For scale benchmarks."""

    def __init__(self, config: Any, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> None:
        self.dtype, self.seed = dtype, seed
        self.std = float(getattr(config, "initializer_range", 0.02))
        self.model = _skeleton(config, dtype)
        self.prefix = self._block_prefix()
        names = [n for n in _meta_names(self.model) if not n.startswith(self.prefix)]
        self._fill(self.model, names, "cpu", seed=seed + 1_000_003)
        if hasattr(self.model, "tie_weights"):
            self.model.tie_weights()

    def _fill(self, module: nn.Module, names: list[str], device: torch.device | str, seed: int) -> None:
        g = torch.Generator(device=device).manual_seed(seed)
        shapes = dict((*module.named_parameters(), *module.named_buffers()))
        for n in names:
            shape = shapes[n].shape
            if len(shape) >= 2:
                t = torch.randn(shape, generator=g, device=device, dtype=torch.float32).mul_(self.std).to(self.dtype)
            elif "norm" in n and n.endswith("weight"):
                t = torch.ones(shape, device=device, dtype=self.dtype)
            else:
                t = torch.zeros(shape, device=device, dtype=self.dtype)
            _set_tensor(module, n, t)

    def load(self, i: int, device: torch.device | str) -> nn.Module:
        block = self.blocks[1][i]
        self._fill(block, _meta_names(block), device, seed=self.seed * 100_003 + i)
        return block.to(device)



def as_source(model: nn.Module | BlockSource) -> BlockSource:
    return model if isinstance(model, BlockSource) else InMemoryBlocks(model)
