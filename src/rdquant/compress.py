"""`compress(model, config) -> CompressedModel`: the one entry point of the algorithms."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import __version__
from .artifact import write_artifact
from .coding import DEFAULT_SPEED_FLOOR_MBPS, encode_tensors
from .config import CompressConfig, LayerLog, check_device
from .data import calibration_windows
from .errors import RdquantError
from .methods import METHODS
from .methods.cvxq import check_target
from .vocab import check_vocab
from .models import block_linears, find_blocks, load_model
from .pipeline import Checkpoint, run_pipeline
from .runtime import QUANT_BUFFERS, QuantLinear
from .source import BlockSource


def dense_dtype_for(model: nn.Module) -> torch.dtype:
    """16-bit storage for everything left unquantized: bf16 if the model is bf16, else fp16."""
    return torch.bfloat16 if next(model.parameters()).dtype == torch.bfloat16 else torch.float16


def round_to_storage(model: nn.Module, dense: torch.dtype) -> None:
    """Round what stays dense to its 16-bit storage dtype, so the model equals the saved one exactly."""
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.to(dense).to(p.dtype)


@dataclass
class CompressedModel:
    """A quantized transformers model (QuantLinear modules) plus what is needed to save it."""

    model: nn.Module
    tokenizer: Any
    config: CompressConfig
    model_id: str
    logs: list[LayerLog] = field(default_factory=list)
    seconds: float = 0.0
    dense_dtype: torch.dtype = torch.float16  # storage of everything left unquantized
    method_state: Any = None  # run-wide state of the method (cvxq: the allocation, with its time)
    tuning: dict | None = None  # what distillation tuning did (tune.TuneLog), when it ran
    block_files: Any = None  # a streamed run: the blocks live only in these files (pipeline.BlockFiles)

    @property
    def streamed(self) -> bool:
        """True when `model` is a skeleton (blocks on meta): save it, then `rdquant.load` the artifact."""
        return self.block_files is not None

    def state_for_artifact(self) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, Any]]:
        """(tensors, tied aliases, quantized-module table): packed buffers as they are, every other
        floating tensor in the 16-bit dense dtype, tied weights stored once."""
        dense = self.dense_dtype
        modules = [(n, m) for n, m in self.model.named_modules() if isinstance(m, QuantLinear)]
        quantized = {name: {"method": getattr(m, "solver", None) or self.config.method, **m.table_entry()}
                     for name, m in modules}
        for _, m in modules:  # a tied head is the embedding's entry (`tied_head`), stored once
            if getattr(m, "tied_head", None):
                quantized.pop(m.tied_head, None)
        if self.block_files is not None:
            quantized.update({n: {"method": self.config.method, **e} for n, e in self.block_files.quantized.items()})
        tensors: dict[str, torch.Tensor] = {}
        tied: dict[str, str] = {}
        seen: dict[tuple, str] = {}
        for name, t in self.model.state_dict(keep_vars=False).items():  # all alive: an address is one tensor's
            owner, _, leaf = name.rpartition(".")
            if t.is_meta:  # a streamed run's block: read from its block file below
                continue
            key = (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)  # a view at the same address is not a tie
            if key in seen and t.numel():
                tied[name] = seen[key]
                continue
            seen[key] = name
            if not (owner in quantized and leaf in QUANT_BUFFERS) and t.is_floating_point():
                t = t.to(dense)
            tensors[name] = t
        if self.block_files is not None:
            return StreamedTensors(tensors, self.block_files, quantized, dense), tied, quantized
        return tensors, tied, quantized

    def save(
        self,
        out: str | Path,
        overwrite: bool = False,
        codec: str = "none",
        speed_floor_mbps: float = DEFAULT_SPEED_FLOOR_MBPS,
    ) -> Path:
        """Write the artifact directory (atomic: `out` appears complete or not at all). With a codec
        (none | zstd-L | lz4 | ans | auto) the quantized layers' tensors are entropy-coded."""
        tensors, tied, quantized = self.state_for_artifact()
        stored = encode_tensors(tensors, quantized, codec, speed_floor_mbps)
        manifest = {
            "rdquant_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source_model": self.model_id,
            "architecture": (getattr(self.model.config, "architectures", None) or [type(self.model).__name__])[0],
            "recipe": self.config.to_dict(),
            "dense_dtype": str(self.dense_dtype).removeprefix("torch."),
            "packing": "lsb-first, 8 codes per `bits` bytes, row-major [out, in]",
            "compress_seconds": round(self.seconds, 2),
            "quantized": quantized,
            "tied": tied,
            "codec": {"requested": codec, "speed_floor_mbps": speed_floor_mbps, "dense": False},
        }
        if self.tuning is not None:
            manifest["tuning"] = self.tuning
        if self.config.kv_bits:  # the cache's spec; each attention module's key shift is a tensor (kv_shift_k)
            from .kvcache import spec_of

            manifest["kv_cache"] = spec_of(self.config).to_dict()
        log = [asdict(entry) for entry in self.logs]
        extra = {
            "config": lambda d: self.model.config.save_pretrained(d),
            "tokenizer": lambda d: self.tokenizer.save_pretrained(d) if self.tokenizer is not None else None,
            "log": lambda d: (Path(d) / "quant_log.json").write_text(json.dumps(log, indent=1)),
        }
        write_artifact(Path(out), tensors, manifest, extra, overwrite=overwrite, stored=stored)
        return Path(out)


class StreamedTensors(Mapping):
    """The artifact's tensors of a streamed run: what is in memory (embedding, head, final norm) and,
    read one at a time from the block files, every block's tensors (dense ones cast to `dense`)."""

    def __init__(self, front: dict[str, torch.Tensor], files: Any, quantized: dict[str, Any], dense: torch.dtype):
        self.front, self.files, self.quantized, self.dense = front, files, quantized, dense
        self._order = list(front) + [n for n in files if n not in front]

    def _is_dense(self, name: str, dtype: torch.dtype) -> bool:
        owner, _, leaf = name.rpartition(".")
        return dtype.is_floating_point and not (owner in self.quantized and leaf in QUANT_BUFFERS)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.front:
            return self.front[name]
        t = self.files[name]
        return t.to(self.dense) if self._is_dense(name, t.dtype) else t

    def __iter__(self):
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)

    def nbytes_of(self, name: str) -> int:
        if name in self.front:
            t = self.front[name]
            return t.numel() * t.element_size()
        n, dtype = self.files.nbytes_of(name), self.files.dtype_of(name)
        if self._is_dense(name, dtype):
            n = n // dtype.itemsize * self.dense.itemsize
        return n


def warn_short_windows(config, seqlen: int) -> None:
    """A sliding-window model calibrated on windows shorter than its attention window never shows the
    quantizer the attention it runs with: say so (the run goes on)."""
    import sys

    window = getattr(config, "sliding_window", None)
    used = getattr(config, "use_sliding_window", True) and window
    if used and seqlen < int(window):
        print(f"[rdquant] warning: calibration windows of {seqlen} tokens are shorter than this model's sliding "
              f"attention window ({window}); --calib-seqlen {window} calibrates what it runs", file=sys.stderr)


CLAQ_TOKENS = 65536  # calibration tokens CLAQ was measured to need (issue 21: it lost to GPTQ at 8,192)


def warn_few_tokens(cfg: CompressConfig, tokens: int) -> None:
    """CLAQ's column codebooks and outlier ranking follow the calibration Hessian closely: with few tokens
    they fit its noise (measured: 16 x 512 tokens, ppl 49.49 against GPTQ's 46.03; with 128 x 512 CLAQ
    wins). Say so before the run (it goes on)."""
    import sys

    if tokens < CLAQ_TOKENS and (cfg.method == "claq" or (cfg.method == "cvxq" and cfg.cvxq_solver == "claq")):
        print(f"[rdquant] warning: {tokens:,} calibration tokens; CLAQ was measured to lose to GPTQ with 8,192 "
              f"(16 x 512) and to win with {CLAQ_TOKENS:,} (128 x 512): raise --calib-samples / --calib-seqlen, or "
              "use --method gptq", file=sys.stderr)


def compress(
    model: "nn.Module | str | BlockSource",
    config: CompressConfig | None = None,
    tokenizer: Any = None,
    calib_ids: torch.Tensor | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    model_id: str | None = None,
    after_block: Callable[[int], None] | None = None,
) -> CompressedModel:
    """Quantize the decoder-block linears of `model` (modified in place) per `config`.

    `model` is a transformers causal LM, anything `--model` accepts, or a block source (source.py); a
    streamed source needs `checkpoint_dir` (finished blocks are written there as they finish). Calibration windows come from
    `calib_ids` [N, L] if given, else from `config.calib` (None: the bundled C4 sample) via the tokenizer.
    With `checkpoint_dir`, finished blocks are saved there and `resume=True` continues from them.
    """
    cfg = (config or CompressConfig()).resolved()
    check_device(cfg.device)
    t0 = time.perf_counter()
    if isinstance(model, (str, Path)):
        model, tokenizer, model_id = load_model(str(model))
    source = model if isinstance(model, BlockSource) else None
    model = source.model if source is not None else model
    check_target(model, cfg)  # from the shapes alone, before calibration
    check_vocab(model, cfg)
    check_sparse_shapes(model, cfg)
    check_kv_spec(model, cfg)
    dense = dense_dtype_for(model) if source is None else source_dense_dtype(source)
    if source is not None and source.streamed:
        if checkpoint_dir is None:
            raise RdquantError("a streamed source writes each finished block to disk: pass checkpoint_dir")
        if cfg.tunes("model"):
            raise RdquantError("--tune-scope model needs the whole model in memory: use --tune-scope block (each "
                               "block tuned in the pipeline), an in-memory model, or --tune-steps 0")
    elif next(model.parameters()).dtype != torch.float32 and cfg.device == "cpu":
        model = model.float()
        source = None
    if calib_ids is None and (METHODS[cfg.method].needs_hessian or cfg.tune_steps or cfg.kv_bits):
        if tokenizer is None:
            raise RdquantError("calibration needs a tokenizer (or pass calib_ids)")
        calib_ids = calibration_windows(tokenizer, cfg.calib, cfg.calib_samples, cfg.calib_seqlen, cfg.seed)
    if calib_ids is not None:
        warn_short_windows(model.config, calib_ids.shape[1])
        warn_few_tokens(cfg, calib_ids.numel())
    model_id = model_id or getattr(model.config, "_name_or_path", "") or type(model).__name__
    ckpt = Checkpoint(Path(checkpoint_dir), cfg, model_id) if checkpoint_dir else None
    model.eval()
    teacher = copy.deepcopy(model) if cfg.tunes("model") else None  # the original, for tuning
    state = run_pipeline(source or model, cfg, calib_ids, ckpt, resume, progress, after_block)
    round_to_storage(model, dense)
    files = None
    if source is not None and source.streamed:
        blocks_name, blocks = find_blocks(model)
        files = ckpt.block_files(blocks_name, len(blocks))  # type: ignore[union-attr]
    tuning = None
    if teacher is not None:
        from .tune import tune

        home, dev = next(model.parameters()).device, torch.device(cfg.device)
        model.to(dev)
        tuning = tune(model, teacher.to(dev), calib_ids, cfg.tune_steps, cfg.tune_lr, cfg.tune_batch,
                      seed=cfg.seed, progress=progress, scale_bits=cfg.scale_bits).to_dict()
        model.to(home)
        del teacher
    if cfg.tunes("block"):
        tuning = state.tuning
    return CompressedModel(model, tokenizer, cfg, model_id, state.logs, time.perf_counter() - t0, dense,
                           state.method_state, tuning, files)


def check_kv_spec(model: nn.Module, cfg: CompressConfig) -> None:
    """--kv-bits: the model has attention modules whose heads the KV spec fits (before calibration)."""
    if not cfg.kv_bits:
        return
    from .kvcache import attention_modules, head_shape, spec_of

    mods = attention_modules(model)
    if not mods:
        raise RdquantError("--kv-bits: this model has no attention modules with k_proj / v_proj / o_proj; "
                           "compress without --kv-bits")
    spec_of(cfg).check(head_shape(mods[0])[1])


def check_sparse_shapes(model: nn.Module, cfg: CompressConfig) -> None:
    """Sparsity (--method slim) needs every quantized linear's input width to be a multiple of 4 (2:4) or
    even (unstructured: half of every row)."""
    if cfg.method != "slim":
        return
    m = 4 if cfg.slim_pattern == "2:4" else 2
    blocks_name, blocks = find_blocks(model)
    for i, block in enumerate(blocks):
        for n, lin in block_linears(block, cfg.skip).items():
            if lin.in_features % m:
                raise RdquantError(f"--method slim: {blocks_name}.{i}.{n} has {lin.in_features} inputs, not a multiple "
                                   f"of {m}, so it cannot be {cfg.slim_pattern} sparse; use another --method for this model")


def source_dense_dtype(source: BlockSource) -> torch.dtype:
    """16-bit storage of a source's dense tensors: bf16 for a bf16 checkpoint, else fp16."""
    declared = getattr(source, "stored_dtype", None) or next(source.model.parameters()).dtype
    return torch.bfloat16 if declared == torch.bfloat16 else torch.float16
