"""Configuration as data: one frozen dataclass per job, readable from a YAML recipe.

Every option's default, help, CLI flag, help panel, the methods that use it and its valid range live
here, in the field's metadata (`opt`); the CLI's flags, `--help` and the recipe loader are derived from
them (cli.py), so they cannot disagree. Options that lost to the defaults in every measurement
(docs/notes/benchmarks-lab.md) are `experimental`: no visible flag, set only through
`--experimental KEY=VALUE` or a recipe's `experimental:` mapping.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from .errors import RdquantError

METHODS = ("gptq", "rtn", "claq", "cvxq", "slim", "ecsq")
EXPERIMENTAL_METHODS = ("ecsq",)  # lost to cvxq --rate coded at the same coded size (31.62 vs 37.93)
BITS = (2, 3, 4, 5, 6, 7, 8)
LOST = "it lost to the default in every measurement (docs/notes/benchmarks-lab.md)"

# which methods use an option (a given option the chosen method does not use is refused)
ALL = None


def _solver(*solvers: str) -> Callable[["CompressConfig"], bool]:
    return lambda c: c.method == "cvxq" and c.cvxq_solver in solvers


def _uses(methods: tuple[str, ...], cvxq_solvers: tuple[str, ...] = ()) -> Callable[["CompressConfig"], bool]:
    """Used by `methods`, and by cvxq when its solver is one of `cvxq_solvers`; ecsq (experimental) takes all."""
    return lambda c: c.method in methods or c.method == "ecsq" or (c.method == "cvxq" and c.cvxq_solver in cvxq_solvers)


_AFFINE_METHODS = _uses(("gptq", "rtn"), ("gptq", "rtn"))
_AFFINE = lambda c: _AFFINE_METHODS(c) and c.grid == "affine"
_KQUANT = lambda c: c.method in ("gptq", "rtn", "cvxq") and c.grid != "affine"
GRIDS = ("affine", "gguf", "gguf:Q2_K", "gguf:Q3_K", "gguf:Q4_K", "gguf:Q5_K", "gguf:Q6_K")
_SWEEP = _uses(("gptq", "claq"), ("gptq", "claq"))


def _slim_group(c: "CompressConfig") -> bool:
    return c.method == "slim" and c.slim_scale == "group"


GRID = lambda c: _AFFINE(c) or _slim_group(c)  # affine group grids: gptq, rtn, cvxq with those solvers, slim's group scales
SEARCHED = lambda c: GRID(c) or _KQUANT(c)  # grids fitted by the clip search (affine and k-quant)
GPTQ_SWEEP = _SWEEP  # the error-compensating column sweep with act-order (slim's runs of four keep the natural order)
SOLVE_SWEEP = lambda c: _SWEEP(c) or (c.method == "slim" and c.slim_solver == "gptq")  # the sweep, any order
SLIM = lambda c: c.method == "slim"
LOWRANK = lambda c: c.lowrank != 0  # a fraction, or -1: auto (cvxq)
KV = lambda c: c.kv_bits > 0
CLAQ = _uses(("claq",), ("claq",))
CVXQ = _uses(("cvxq",))
TARGETED = _uses(("claq", "cvxq"))


def _group_size_used(c: "CompressConfig") -> bool:
    return (c.method == "ecsq" or (c.method in ("gptq", "rtn") and c.grid == "affine") or _slim_group(c)
            or (c.method == "cvxq" and c.cvxq_solver != "claq" and c.cvxq_cells in ("group", "layer")))


def _cluster_rows_used(c: "CompressConfig") -> bool:
    return c.method == "cvxq" and c.cvxq_solver != "claq" and c.cvxq_cells == "cluster"


def _bits_used(c: "CompressConfig") -> bool:
    return (c.method in ("slim", "ecsq") or (c.method in ("gptq", "rtn") and c.grid == "affine")
            or (c.method == "claq" and c.target_bits is None))


def opt(default: Any, help: str, *, flag: str | None = None, short: str | None = None, panel: str = "General",
        uses: Callable[["CompressConfig"], bool] | None = ALL, choices: tuple | None = None,
        lo: float | None = None, hi: float | None = None, experimental: bool = False,
        experimental_values: tuple = (), cli: bool = True, unit: str = "") -> Any:
    """A config field with what the CLI and the validation need: the flag (default --field-name),
    help text, --help panel, the methods using it, choices or a closed range [lo, hi]."""
    meta = dict(help=help, flag=flag, short=short, panel=panel, uses=uses, choices=choices, lo=lo, hi=hi,
                experimental=experimental, experimental_values=experimental_values, cli=cli and not experimental, unit=unit)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class CompressConfig:
    """Everything that decides the compressed weights (recorded in the artifact's manifest)."""

    method: str = opt("gptq", "gptq | rtn | claq | cvxq | slim (2:4 sparse + quantized)", choices=METHODS, experimental_values=EXPERIMENTAL_METHODS)
    bits: int = opt(4, "code width of every weight (claq: of every column, without --target-bits)",
                    choices=BITS, uses=_bits_used)
    group_size: int = opt(64, "weights per scale group along a row; -1 = one scale per row", short="-g",
                          uses=_group_size_used)
    symmetric: bool = opt(False, "symmetric grids (no zero points)", uses=GRID)
    grid: str = opt("affine", "the grid gptq / rtn solve in: affine (--bits, --group-size, --symmetric) or a llama.cpp "
                    "k-quant, gguf:Q2_K .. gguf:Q6_K, exported to GGUF as is (rows that are not whole 256-weight "
                    "super-blocks take llama.cpp's block-32 fallback type); with cvxq, gguf: a size-targeted mix of "
                    "llama.cpp types, one per linear", choices=GRIDS,
                    uses=lambda c: c.method in ("gptq", "rtn", "cvxq"))
    # size targets: all-in bits per weight (codes + every piece of side information)
    target_bits: float | None = opt(None, "all-in bits/weight: claq of every layer, cvxq of all quantized layers together (and the "
                                    "embedding / head with --embed-bits -1, the default)",
                                    panel="Size target (claq, cvxq)", uses=TARGETED, lo=0.1, hi=16)
    target_size: int | None = opt(None, "bytes of the quantized layers (and embedding / head with --embed-bits -1), all-in, "
                                  "e.g. 40MB, 38.5MiB",
                                  panel="Size target (claq, cvxq)", uses=CVXQ, lo=1, unit="size")
    target_size_total: int | None = opt(None, "bytes of the whole tensor file (16-bit rest included), e.g. 100MB",
                                        panel="Size target (claq, cvxq)", uses=CVXQ, lo=1, unit="size")
    # GPTQ (Frantar et al. 2022)
    act_order: bool = opt(True, "quantize columns by decreasing H_jj (static groups)", panel="GPTQ solver", uses=GPTQ_SWEEP)
    damp_percent: float = opt(0.01, "damping: lambda = damp x mean(diag H)", flag="--damp", panel="GPTQ solver",
                              uses=SOLVE_SWEEP, lo=0, hi=0.999)
    block_size: int = opt(128, "lazy-batch width of the column sweep", panel="GPTQ solver", uses=SOLVE_SWEEP, lo=1, hi=1 << 16)
    # CVXQ (Young 2024): one global rate-distortion allocation of widths to cells, then a solver per layer
    cvxq_solver: str = opt("gptq", "quantizes each cell at its width: gptq | rtn | claq", flag="--solver",
                           panel="CVXQ allocation", uses=CVXQ, choices=("gptq", "rtn", "claq"))
    cvxq_sensitivity: str = opt("gradient", "gradient (CVXQ: PCA-projected output) | fisher (sampled-token log-lik.)",
                                flag="--sensitivity", panel="CVXQ allocation", uses=CVXQ,
                                choices=("gradient", "fisher", "hessian"), experimental_values=("hessian",))
    cvxq_max_bits: int = opt(7, "widest cell", flag="--max-bits", panel="CVXQ allocation", uses=CVXQ, lo=1, hi=8)
    cvxq_min_bits: int = opt(-1, "narrowest cell; -1 = 2 with uniform grids, 0 with claq", flag="--min-bits",
                             panel="CVXQ allocation", uses=CVXQ, lo=-1, hi=8)
    cvxq_rate: str = opt("stored", "what the target counts: stored (packed bits) | coded (the codes at their entropy: "
                         "the size after --codec auto; solver gptq or rtn)", flag="--rate", panel="CVXQ allocation",
                         uses=CVXQ, choices=("stored", "coded"))
    cvxq_cluster_rows: int = opt(128, "rows per cell cluster (rows of similar sensitivity share a width per column)",
                                 flag="--cluster-rows", panel="CVXQ allocation", uses=_cluster_rows_used, lo=1, hi=1 << 20)
    cvxq_samples: int = opt(32, "calibration windows used for the sensitivities", flag="--sensitivity-samples",
                            panel="CVXQ allocation", uses=CVXQ, lo=1, hi=1 << 20)
    cvxq_components: int = opt(64, "principal directions of the final hidden state", flag="--sensitivity-components",
                               panel="CVXQ allocation", uses=CVXQ, lo=1, hi=1 << 16)
    cvxq_stride: int = opt(8, "token positions at this stride", flag="--sensitivity-stride", panel="CVXQ allocation",
                           uses=CVXQ, lo=1, hi=1 << 16)
    cvxq_batch: int = opt(4, "windows per forward/backward of the sensitivity pass", flag="--sensitivity-batch",
                          panel="CVXQ allocation", uses=CVXQ, lo=1, hi=1 << 16)
    cvxq_cells: str = opt("cluster", "cells: cluster (rows x one column) | layer (one width per linear at --group-size, "
                          "q/k/v and gate/up together: exports to compressed-tensors) | group (one row x group_size "
                          "columns)", flag="--cells", panel="CVXQ allocation", uses=CVXQ,
                          choices=("group", "cluster", "layer"), experimental_values=("group",))
    cvxq_grid: str = opt("uniform", "cluster cells' grid: uniform | laplace (companded)", uses=CVXQ,
                         choices=("uniform", "laplace"), experimental=True)
    cvxq_kappa: str = opt("gauss", "distortion vs width: gauss (Lloyd-Max) | grid (measured)", uses=CVXQ,
                          choices=("gauss", "grid"), experimental=True)
    cvxq_cell_group: int = opt(0, "group cells: columns sharing a width (multiple of group_size; -1 whole row)",
                               uses=CVXQ, lo=-1, hi=1 << 20, experimental=True)
    # SLiM (Mozaffari et al. 2025): 2:4 sparsity + quantization (methods/slim.py)
    slim_pattern: str = opt("2:4", "2:4 (two of every four inputs: the GPU kernel's pattern) | unstructured (any half "
                            "of each row, a 1-bit mask per weight: the same bytes as 2:4, a freer mask, no GPU kernel)",
                            flag="--sparsity", panel="SLiM (sparsity)", uses=SLIM, choices=("2:4", "unstructured"))
    slim_mask: str = opt("sparsegpt", "which weights stay (2:4: two of every four inputs; unstructured: half of each "
                         "row, SparseGPT's choice made per row within each 128-column block): sparsegpt (SparseGPT's rule inside the "
                         "solver's sweep) | wanda (|W| x input norm, on the original weights)", flag="--mask", panel="SLiM (sparsity)",
                         uses=SLIM, choices=("wanda", "sparsegpt"))
    slim_scale: str = opt("group", "matrix (SLiM-Quant: one symmetric scale per matrix from the |W| histogram) | group "
                          "(a grid per --group-size weights)", flag="--slim-scale", panel="SLiM (sparsity)", uses=SLIM,
                          choices=("matrix", "group"))
    slim_refit: bool = opt(True, "re-fit the kept weights to the layer's least-squares optimum on the mask before "
                           "quantizing (on the default model 9-23% less layer error than SparseGPT's sweep alone)", flag="--refit",
                           panel="SLiM (sparsity)", uses=SLIM)
    slim_solver: str = opt("gptq", "gptq (prune and quantize in GPTQ's error-compensating sweep) | rtn (round the masked "
                           "weights)", flag="--slim-solver", panel="SLiM (sparsity)", uses=SLIM, choices=("gptq", "rtn"))
    # low-rank adapters (lowrank.py), any method: a saliency-weighted rank-r repair of the quantization error
    lowrank: float = opt(0.0, "adapters' rank as a fraction of min(in, out), rounded up to 16 (128 for layers >= 2048 "
                         "wide); 0 = no adapters; auto (-1; cvxq) = its allocation gives each matrix the rank (0, 5, 10 "
                         "or 20%) that buys more than the same bits spent on widths. Their bytes count in the size",
                         panel="Low-rank adapters", lo=-1, hi=1, unit="auto")
    lowrank_rounds: int = opt(1, "times the base is solved again against W minus the adapters (each followed by "
                              "re-fitted adapters): 2 lowers the layer error by a further 3-6% for one more solve",
                              panel="Low-rank adapters", uses=LOWRANK, lo=1, hi=10)
    lowrank_bits: int = opt(4, "code width of the adapter factors (symmetric); 16 = fp16", panel="Low-rank adapters",
                            uses=LOWRANK, choices=(2, 3, 4, 5, 6, 7, 8, 16))
    lowrank_group: int = opt(128, "adapter weights per scale group along each factor's input", panel="Low-rank adapters",
                             uses=lambda c: c.lowrank != 0 and c.lowrank_bits != 16, lo=8, hi=1 << 20)
    # KV cache (WKVQuant, kvcache.py), any method
    kv_bits: int = opt(0, "bits of the cached keys and values: generation and evaluation of the artifact use a "
                       "quantized KV cache (past-only, token-wise groups); 0 = a 16-bit cache", panel="KV cache",
                       choices=(0, 2, 3, 4, 8))
    kv_group: int = opt(-1, "cached values per scale group along each head (keys too with --kv-key-axis token); "
                        "-1 = the whole head", panel="KV cache", uses=KV, lo=-1, hi=1 << 16)
    kv_key_axis: str = opt("channel", "keys' grids: channel (one per channel per --kv-key-tokens tokens; the newest "
                           "partial group waits in 16 bits) | token (WKVQuant's token-wise groups, as the values)",
                           panel="KV cache", uses=KV, choices=("channel", "token"))
    kv_key_tokens: int = opt(32, "tokens per key group with --kv-key-axis channel", panel="KV cache",
                             uses=lambda c: c.kv_bits > 0 and c.kv_key_axis == "channel", lo=1, hi=4096)
    kv_clip: str = opt("auto", "each group's range clipped to the fraction (1, 0.9, 0.8, 0.7) of least squared "
                       "error: on | off | auto (on at 2 bits, where it helps; off above, where min-max did better)",
                       panel="KV cache", uses=KV, choices=("auto", "on", "off"))
    kv_residual: int = opt(0, "most recent past tokens the cache keeps in 16 bits", panel="KV cache", uses=KV, lo=0,
                           hi=1 << 20)
    kv_smooth: float = opt(-1, "WKVQuant's key smoothing: per-channel scales max|k|^a / max|q|^(1-a) folded into "
                           "q/k_proj (0.5 helps token-wise keys; channel keys don't need it); -1 = off", panel="KV cache",
                           uses=KV, lo=-1, hi=1)
    kv_shift: bool = opt(False, "WKVQuant's static per-channel shifts (mid-range) of keys (in the cache) and values "
                         "(folded into the v_proj / o_proj biases) before the groups (helps token-wise keys)",
                         panel="KV cache", uses=KV)
    kv_crr: int = opt(0, "WKVQuant's cross-block reconstruction: learn each block's K/V scales and shifts "
                      "(AdamW, straight-through rounding) so the output after this many more full-precision blocks "
                      "matches the unquantized cache's; 0 = off", panel="KV cache", uses=KV, lo=0, hi=64)
    kv_crr_steps: int = opt(16, "optimiser steps per block for --kv-crr (one calibration batch each)", panel="KV cache",
                            uses=lambda c: c.kv_bits > 0 and c.kv_crr > 0, lo=1, hi=1 << 20)
    kv_crr_lr: float = opt(5e-3, "AdamW learning rate for --kv-crr", panel="KV cache",
                           uses=lambda c: c.kv_bits > 0 and c.kv_crr > 0, lo=1e-6, hi=1.0)
    bias_correction: bool = opt(False, "store (W - Q) times the mean input as a bias per layer", lo=None)
    # CLAQ (Wang et al. 2024): column K-means codebooks inside GPTQ
    claq_share: int = opt(1, "columns per codebook", flag="--codebook-share", panel="CLAQ codebooks", uses=CLAQ, lo=1, hi=1 << 16)
    claq_row_scale: bool = opt(True, "fp16 row scales, codebooks on row-normalised values", flag="--row-scale",
                               panel="CLAQ codebooks", uses=CLAQ)
    claq_entropy_lambda: float = opt(0.0, "entropy-constrained codes: rate weighed against distortion "
                                     "(0.7: ~2% smaller coded file, ~3% more layer error); 0 = nearest centroid",
                                     flag="--entropy-lambda", panel="CLAQ codebooks", uses=CLAQ, lo=0, hi=100)
    claq_kmeans_iters: int = opt(20, "Lloyd steps of the batched K-means", flag="--kmeans-iters", panel="CLAQ codebooks",
                                 uses=CLAQ, lo=1, hi=10_000)
    claq_refine_iters: int = opt(4, "Lloyd steps on each column's updated values in the sweep", flag="--refine-iters",
                                 panel="CLAQ codebooks", uses=CLAQ, lo=0, hi=10_000)
    claq_policy: str = opt("rd", "column widths under a target: rd (water-filling) | outlier (CLAQ's rule)",
                           uses=CLAQ, choices=("rd", "outlier"), experimental=True)
    claq_high_bits: int = opt(0, "outlier policy: promoted columns' width; 0 = low + 1", uses=CLAQ,
                              choices=(0, *BITS), experimental=True)
    claq_outlier_factor: float = opt(13.0, "|w| > factor x mean|W| counts as an outlier (column ranking)",
                                     uses=CLAQ, lo=1e-6, hi=1e6, experimental=True)
    claq_outlier_frac: float = opt(0.0, "share of entries kept in fp16 (outlier reservation)", uses=CLAQ,
                                   lo=0, hi=0.499, experimental=True)
    claq_codebook_bits: int = opt(8, "codebook entries: 8 (uint8 + fp16 range) | 16 (fp16)", uses=CLAQ,
                                  choices=(8, 16), experimental=True)
    claq_scale_group: int = opt(-1, "row scales per group of this many columns (-1: one per row)", uses=CLAQ,
                                lo=-1, hi=1 << 20, experimental=True)
    claq_hessian_weight: bool = opt(True, "shared codebooks: weight each column's values by H_jj", uses=CLAQ,
                                    experimental=True)
    # ECSQ (experimental method): entropy-constrained grid whose coded size meets this many bits per weight
    target_coded_bits: float | None = opt(None, "ecsq: coded bits per weight, all-in", lo=0.5, hi=7,
                                          uses=lambda c: c.method == "ecsq", experimental=True)
    # distillation tuning (tune.py): after the solver, move codebook values / row scales / group scales
    # (codes fixed, size unchanged) so the model's next-token distribution matches the original's
    tune_steps: int = opt(0, "Adam steps of distillation tuning after the solver (codes and size unchanged); 0 = off. "
                          "With --tune-scope block: steps per block", panel="Tuning", lo=0, hi=1 << 20)
    tune_scope: str = opt("model", "model (the whole model's next-token KL against the original: needs both models in "
                          "memory) | block (each block's output against the float block's on the same inputs, one "
                          "calibration batch a step, inside the block-by-block pipeline: streams, any model size)",
                          flag="--tune-scope", panel="Tuning", uses=lambda c: c.tune_steps > 0, choices=("model", "block"))
    tune_lr: float = opt(1e-3, "tuning step, relative to each tensor's magnitude", panel="Tuning", lo=1e-12, hi=10.0,
                         uses=lambda c: c.tune_steps > 0)
    tune_batch: int = opt(4, "calibration windows per tuning step (--tune-scope block: --batch-size)", panel="Tuning",
                          lo=1, hi=1 << 16, uses=lambda c: c.tunes("model"))
    # grid: shrink the min-max range by up to max_shrink in clip_search steps (0 = plain min-max)
    clip_search: int = opt(20, "grid shrink steps; 0 = min-max", uses=SEARCHED, lo=0, hi=1000)
    max_shrink: float = opt(0.3, "largest shrink of the min-max range the clip search tries", uses=SEARCHED, lo=0, hi=0.99)
    # affine grids' fp16 scales keep this many of fp16's 10 mantissa bits (the rest zero): fewer bits
    # compress under a codec (relative scale error <= 2**-(bits + 1)); the packed file stays fp16
    scale_bits: int = opt(7, "mantissa bits kept in the fp16 group scales (the file stays fp16); 7 codes 1-2% smaller "
                          "under --codec at equal or lower perplexity (GPTQ g64, 2-4 bits), 10 = full",
                          uses=GRID, lo=1, hi=10)
    # calibration
    calib: str | None = opt(None, "calibration text or JSONL file (None: the bundled C4 sample)", panel="Calibration")
    calib_samples: int = opt(128, "calibration windows", panel="Calibration", lo=1, hi=1 << 20)
    calib_seqlen: int = opt(512, "tokens per calibration window", panel="Calibration", lo=8, hi=1 << 20)
    seed: int = opt(0, "seed of the calibration windows and every random choice", panel="Calibration", lo=0, hi=2**63 - 1)
    batch_size: int = opt(16, "calibration windows per forward", panel="Calibration", lo=1, hi=1 << 20)
    reuse_activations: bool = opt(True, "serve unchanged submodule outputs between stages (memory for speed; "
                                  "off on a GPU whose activations are parked in CPU memory)",
                                  panel="Calibration")
    activations: str = opt("auto", "where calibration activations live between blocks: auto (on the device when they "
                           "fit, else pinned CPU memory), device, cpu (least GPU memory)", choices=("auto", "device", "cpu"),
                           panel="Calibration")
    # what to quantize
    embed_bits: int = opt(-1, "bits of the token embedding and the output head (symmetric, row-wise groups of "
                          "--group-size along the hidden size; the head solved with GPTQ); -1 (auto): cvxq's "
                          "allocation chooses, other methods 8; 16 keeps them 16-bit",
                          choices=(-1, 2, 3, 4, 5, 6, 7, 8, 16))
    skip: tuple[str, ...] = opt(("lm_head",), "module-name suffixes left in 16 bit", cli=False)
    device: str = opt("cpu", "cpu | cuda | cuda:N")

    def tunes(self, scope: str) -> bool:
        """Whether distillation tuning runs, at this --tune-scope (model | block)."""
        return self.tune_steps > 0 and self.tune_scope == scope

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = _check_type(f, getattr(self, f.name))
            object.__setattr__(self, f.name, value)
            _check_range(f, value)
        _check_combinations(self)

    def replace(self, **changes: Any) -> "CompressConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["skip"] = list(self.skip)
        return d

    def resolved(self) -> "CompressConfig":
        """The settings the algorithms read: cvxq's cluster cells take their rows from --cluster-rows
        through `group_size` (the field the cell code shares with group cells)."""
        if _cluster_rows_used(self):
            return self.replace(group_size=self.cvxq_cluster_rows)
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "recipe") -> "CompressConfig":
        """A config from a recipe mapping: plain keys, plus an `experimental:` mapping for the options
        that lost to the defaults. Types, ranges, combinations and unused options are checked."""
        if not isinstance(d, dict):
            raise RdquantError(f"{where} must be a mapping of options (got {type(d).__name__})")
        experimental = d.get("experimental") or {}
        if not isinstance(experimental, dict):
            raise RdquantError(f"{where}: 'experimental:' must hold a mapping of options")
        return from_settings(experimental, {k: v for k, v in d.items() if k != "experimental"}, where=where)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "CompressConfig":
        """Read a recipe: a YAML mapping of CompressConfig fields (optionally all under `compress:`)."""
        return cls.from_dict(read_recipe(path), where=f"recipe {path}")


FIELDS = {f.name: f for f in dataclasses.fields(CompressConfig)}


def flag_of(name: str) -> str:
    f = FIELDS[name]
    return f.metadata["flag"] or "--" + name.replace("_", "-")


@functools.cache
def _hints() -> dict[str, Any]:
    return typing.get_type_hints(CompressConfig)


def _allowed_types(f: dataclasses.Field) -> tuple[type, ...]:
    hint = _hints()[f.name]
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else (hint,)
    return tuple(typing.get_origin(a) or a for a in args)


def _type_name(types_: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null",
             tuple: "a list of strings"}
    return " or ".join(names.get(t, t.__name__) for t in types_)


def _check_type(f: dataclasses.Field, value: Any) -> Any:
    """`value` as the field's type (an int for a float field, a list for a tuple), or a one-line error."""
    allowed = _allowed_types(f)
    ok = False
    if value is None:
        ok = type(None) in allowed
    elif isinstance(value, bool):
        ok = bool in allowed
    elif isinstance(value, int):
        ok = int in allowed or float in allowed
        value = float(value) if int not in allowed else value
    elif isinstance(value, float):
        ok = float in allowed and math.isfinite(value)
    elif isinstance(value, str):
        ok = str in allowed
    elif isinstance(value, (list, tuple)) and tuple in allowed:
        ok = all(isinstance(v, str) for v in value)
        value = tuple(value)
    if not ok:
        raise RdquantError(f"{f.name} (flag {flag_of(f.name)}) must be {_type_name(allowed)}, got {value!r}")
    return value


def _check_range(f: dataclasses.Field, value: Any) -> None:
    m = f.metadata
    if value is None or isinstance(value, (bool, tuple)):
        return
    if m["choices"] is not None and value not in m["choices"]:
        raise RdquantError(f"{f.name} (flag {flag_of(f.name)}) is {value!r}; choose one of "
                           + ", ".join(str(c) for c in m["choices"]))
    if isinstance(value, (int, float)) and ((m["lo"] is not None and value < m["lo"]) or (m["hi"] is not None and value > m["hi"])):
        raise RdquantError(f"{f.name} (flag {flag_of(f.name)}) is {value}; it must be in [{m['lo']}, {m['hi']}]")


def _check_combinations(c: CompressConfig) -> None:
    """Rules that involve more than one option."""
    if c.tunes("block") and c.method == "rtn":
        raise RdquantError("--tune-scope block tunes each block inside the calibrated pipeline, which rtn does not run: "
                           "use --tune-scope model or a calibrated method (gptq, claq, cvxq, slim)")
    if c.grid == "gguf" and c.method != "cvxq":
        raise RdquantError("--grid gguf (a size-targeted mix of llama.cpp types) needs --method cvxq and a size target; "
                           f"{c.method} takes one type, e.g. --grid gguf:Q4_K")
    if c.method == "cvxq" and c.grid not in ("affine", "gguf"):
        raise RdquantError(f"cvxq takes --grid gguf (its allocation picks a llama.cpp type per linear), not {c.grid}")
    if c.method == "cvxq" and c.cvxq_cells == "layer" and (c.cvxq_solver == "claq" or c.cvxq_rate == "coded"
                                                             or c.cvxq_grid != "uniform" or c.grid != "affine"):
        raise RdquantError("cvxq --cells layer solves each linear at one width: use --solver gptq or rtn, the stored "
                           "rate, the uniform grid, and no --grid")
    if c.grid == "gguf" and (c.cvxq_solver == "claq" or c.cvxq_rate == "coded" or c.cvxq_grid != "uniform"):
        raise RdquantError("--grid gguf solves each layer in its GGUF type: use --solver gptq or rtn, the stored rate and "
                           "the uniform grid")
    if c.group_size != -1 and (c.group_size < 8 or c.group_size % 2):
        raise RdquantError(f"unsupported group size {c.group_size}; use -1 (per row) or an even number >= 8")
    if not (c.device == "cpu" or c.device == "cuda" or (c.device.startswith("cuda:") and c.device[5:].isdigit())):
        raise RdquantError(f"unknown device {c.device!r}; use cpu, cuda or cuda:N")
    if c.method == "ecsq" and c.target_coded_bits is None:
        raise RdquantError("method ecsq needs target_coded_bits between 0.5 and 7")
    targets = [t for t in (c.target_bits, c.target_size, c.target_size_total) if t is not None]
    if len(targets) > 1:
        raise RdquantError("give one of --target-bits, --target-size and --target-size-total")
    if c.target_bits is not None and c.method not in ("claq", "cvxq"):
        raise RdquantError(f"--target-bits is not supported by method {c.method}; use --bits")
    if (c.target_size is not None or c.target_size_total is not None) and c.method != "cvxq":
        raise RdquantError("--target-size / --target-size-total need --method cvxq")
    if c.method == "cvxq" and not targets:
        raise RdquantError("method cvxq needs --target-bits, --target-size or --target-size-total")
    if not (c.cvxq_min_bits == -1 or 0 <= c.cvxq_min_bits <= c.cvxq_max_bits):
        raise RdquantError("cvxq: need 0 <= --min-bits <= --max-bits (or -1: automatic)")
    if c.cvxq_grid == "laplace" and (c.cvxq_cells != "cluster" or c.cvxq_solver == "claq"):
        raise RdquantError("cvxq: the laplace (companded) grid needs cluster cells and the gptq or rtn solver")
    if c.cvxq_cells == "cluster" and c.cvxq_cell_group != 0:
        raise RdquantError("cvxq: cvxq_cell_group applies to group cells only")
    if c.cvxq_rate == "coded" and c.cvxq_solver == "claq":
        raise RdquantError("cvxq: --rate coded needs a uniform grid (solver gptq or rtn); CLAQ's K-means codes "
                           "use their levels nearly evenly, so their coded size is their stored size")
    if c.cvxq_cell_group not in (0, -1) and (c.group_size == -1 or c.cvxq_cell_group % c.group_size):
        raise RdquantError("cvxq: the width cell (cvxq_cell_group) must be 0, -1 or a multiple of the group size")
    if c.method == "cvxq" and c.cvxq_solver == "claq" and c.claq_share != 1:
        raise RdquantError("cvxq with the claq solver allocates per column: use --codebook-share 1")
    if c.method == "slim" and c.slim_mask == "sparsegpt" and c.slim_solver == "rtn":
        raise RdquantError("slim: --mask sparsegpt chooses the mask inside the GPTQ sweep; use --slim-solver gptq "
                           "or --mask wanda")
    if c.kv_bits and c.method == "rtn":
        raise RdquantError("--kv-bits calibrates the cache on each block's inputs, which method rtn does not "
                           "compute: use gptq, claq, cvxq or slim")
    if c.kv_group == 0 or c.kv_group < -1:
        raise RdquantError(f"--kv-group must be -1 (the whole head) or a positive divisor of the head size, not {c.kv_group}")
    if c.kv_smooth != -1 and not 0 <= c.kv_smooth <= 1:
        raise RdquantError(f"--kv-smooth must be -1 (off) or between 0 and 1, not {c.kv_smooth}")
    if c.lowrank < 0 and (c.lowrank != -1 or c.method != "cvxq" or c.grid != "affine" or c.cvxq_solver == "claq"
                          or c.cvxq_cells == "layer"):
        raise RdquantError("--lowrank auto (-1) needs --method cvxq with its cluster or group cells and the gptq or rtn "
                           "solver (its allocation prices rank against bits); otherwise give a fraction, e.g. 0.1")
    if c.lowrank > 0 and c.method == "ecsq":
        raise RdquantError("--lowrank is not supported by the experimental ecsq method")
    if c.claq_scale_group != -1 and (c.claq_scale_group < 8 or c.claq_scale_group % 8):
        raise RdquantError("claq: scale group must be -1 (per row) or a multiple of 8")


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | int | None) -> int | None:
    """'40MB' (SI), '38.5MiB' (binary) or a plain byte count -> bytes."""
    import re

    if text is None or (isinstance(text, int) and not isinstance(text, bool)):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise RdquantError(f"cannot read the size {text!r}: use e.g. 40MB, 38.5MiB, 1.2GB or a byte count")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def check_device(device: str) -> None:
    """Refuse a CUDA device this machine does not have, before any work."""
    if device == "cpu":
        return
    import torch

    if not torch.cuda.is_available():
        raise RdquantError(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__}); use --device cpu")
    index = int(device[5:]) if device.startswith("cuda:") else 0
    if index >= torch.cuda.device_count():
        raise RdquantError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def read_recipe(path: str | Path) -> dict[str, Any]:
    """A recipe file as a mapping (keys optionally all under `compress:`), or a one-line error."""
    p = Path(path)
    if not p.is_file():
        raise RdquantError(f"recipe not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise RdquantError(f"recipe {p} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RdquantError(f"recipe {p} is not valid YAML{at}: {getattr(e, 'problem', None) or e}") from e
    if not isinstance(data, dict):
        raise RdquantError(f"recipe {p} must be a YAML mapping of options (got {type(data).__name__})")
    if "compress" in data:
        if set(data) - {"compress"}:
            raise RdquantError(f"recipe {p}: put every option under 'compress:' or none of them")
        data = data["compress"] or {}
        if not isinstance(data, dict):
            raise RdquantError(f"recipe {p}: 'compress:' must hold a mapping of options")
    if not isinstance(data.get("experimental") or {}, dict):
        raise RdquantError(f"recipe {p}: 'experimental:' must hold a mapping of options")
    return data


def from_settings(experimental: dict[str, Any], given: dict[str, Any], base: dict[str, Any] | None = None,
                  where: str = "recipe", flags: bool = False) -> CompressConfig:
    """The one loader of user settings (CLI flags and recipes alike): `given` plain options over `base`
    (a recipe under CLI flags), `experimental` ones over both. Refuses unknown keys, experimental
    options or values given as plain ones, and options the chosen method does not use."""
    name = flag_of if flags else (lambda k: k)
    for key in list(experimental) + list(given):
        if not isinstance(key, str) or key not in FIELDS:
            known = ", ".join(sorted(FIELDS))
            raise RdquantError(f"{where}: unknown option {key!r}; known options: {known}")
    for key, value in given.items():
        m = FIELDS[key].metadata
        if m["experimental"]:
            raise RdquantError(f"{where}: {name(key)} is experimental ({LOST}): set it with --experimental "
                               f"{key}=VALUE or under 'experimental:' in a recipe")
        if isinstance(value, str) and value in m["experimental_values"]:
            raise RdquantError(f"{where}: {name(key)} {value} is experimental ({LOST}): use --experimental "
                               f"{key}={value} or put it under 'experimental:' in a recipe")
    settings = {**(base or {}), **given, **experimental}
    for key, value in settings.items():
        if FIELDS[key].metadata["unit"] == "auto" and isinstance(value, str):
            try:
                settings[key] = -1.0 if value.strip().lower() == "auto" else float(value)
            except ValueError:
                raise RdquantError(f"{where}: {name(key)} is {value!r}; give a number or auto") from None
        if FIELDS[key].metadata["unit"] == "size" and isinstance(value, str):
            settings[key] = parse_size(value)
    cfg = CompressConfig(**settings)
    for key in settings:
        uses = FIELDS[key].metadata["uses"]
        if uses is not None and not uses(cfg):
            shown = flag_of(key) if key in given and flags else key
            raise RdquantError(f"{where}: {shown} is not used by method {cfg.method}"
                               + (f" with solver {cfg.cvxq_solver}" if cfg.method == "cvxq" else "")
                               + (" (cvxq: --cluster-rows sets the rows per cell)" if key == "group_size" and cfg.method == "cvxq" else "")
                               + (" without --lowrank (it sets the adapters, off at 0)" if key.startswith("lowrank_") and cfg.lowrank == 0 else "")
                               + (" without --kv-bits (it sets the KV cache, off at 0)" if key.startswith("kv_") and not cfg.kv_bits else "")
                               + (" with --kv-key-axis token" if key == "kv_key_tokens" and cfg.kv_bits else "")
                               + (" without --tune-steps (tuning is off at 0)" if key.startswith("tune_") and not cfg.tune_steps else "")
                               + (f" with --grid {cfg.grid} (the k-quant fixes widths, groups and scales)"
                                  if cfg.grid != "affine" and key in ("bits", "group_size", "symmetric", "scale_bits") else "")
                               + "; remove it")
    return cfg


@dataclass
class LayerLog:
    """One line of the per-layer log written next to the artifact."""

    name: str
    method: str
    bits: int  # codebook layout: the widest column
    group_size: int  # codebook layout: columns per codebook
    shape: tuple[int, int]
    symmetric: bool = False
    spec: dict | None = None  # codebook layout: what the runtime needs to allocate the layer
    proxy_error_rtn: float | None = None  # tr((W-Q)H(W-Q)^T) of plain rounding onto the same grid
    proxy_error: float | None = None  # the same for the method's result
    weight_mse: float = 0.0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
