"""Configuration as data: one frozen dataclass per job, readable from a YAML recipe."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import RdquantError

METHODS = ("gptq", "rtn", "ecsq", "claq", "cvxq")
BITS = (2, 3, 4, 5, 6, 7, 8)


@dataclass(frozen=True)
class CompressConfig:
    """Everything that decides the compressed weights (recorded in the artifact's manifest)."""

    method: str = "gptq"
    bits: int = 4
    group_size: int = 64  # -1: one scale per output row
    symmetric: bool = False
    # GPTQ (Frantar et al. 2022)
    act_order: bool = True  # columns by decreasing H_jj, with static (pre-computed) groups
    damp_percent: float = 0.01  # lambda = damp_percent * mean(diag(H))
    block_size: int = 128  # lazy-batch width of the column sweep
    # ecsq: entropy-constrained grid whose coded size meets this many bits per weight (all-in)
    target_coded_bits: float | None = None
    # all-in bits per weight of every quantized layer (claq: codes + codebooks + widths + outliers);
    # None = every column `bits` wide. cvxq: of the quantized layers together (bits move between them)
    target_bits: float | None = None
    target_size: int | None = None  # cvxq: bytes of the quantized layers (all-in), instead of target_bits
    target_size_total: int | None = None  # cvxq: bytes of the whole tensor file (16-bit rest included)
    # CVXQ (Young 2024): one global rate-distortion allocation of widths to cells, then a solver per layer
    cvxq_solver: str = "gptq"  # gptq | rtn (per-cell grid search) | claq (column codebooks, column cells)
    cvxq_sensitivity: str = "gradient"  # gradient (CVXQ: PCA-projected output) | fisher (sampled-token log-lik.) | hessian (E[x_j^2]/E[y^2])
    cvxq_max_bits: int = 7  # widest cell (7: 3-bit width field)
    cvxq_rate: str = "stored"  # what the target counts: stored (packed) bits | coded (entropy of each cell's codes, for --codec)
    cvxq_kappa: str = "gauss"  # distortion vs width of a cell: gauss (Lloyd-Max) | grid (measured for the uniform grid)
    cvxq_min_bits: int = -1  # narrowest cell; -1: 2 with uniform grids (gptq, rtn), 0 (a cell may be its centre) with claq
    cvxq_cells: str = "cluster"  # gptq/rtn cells: group (row x group_size columns) | cluster (group_size rows clustered by sensitivity x one column)
    cvxq_grid: str = "uniform"  # cluster cells: uniform (scale + zero point per cell) | laplace (CVXQ's companded grid, scale only)
    cvxq_cell_group: int = 0  # columns sharing a width (a multiple of group_size; -1: the whole row; 0: group_size)
    cvxq_samples: int = 32  # calibration windows used for the sensitivities
    cvxq_components: int = 64  # principal directions of the final hidden state
    cvxq_stride: int = 8  # token positions at this stride
    cvxq_batch: int = 4  # windows per forward/backward
    bias_correction: bool = False  # add (W - Q) E[x] to the layer's bias (a bias is added and stored if none)
    # CLAQ (Wang et al. 2024): column K-means codebooks inside GPTQ
    claq_policy: str = "rd"  # column widths under --target-bits: rd (water-filling) | outlier (CLAQ's rule)
    claq_high_bits: int = 0  # adaptive precision: promoted columns' width; 0 = low + 1 (CLAQ used 4)
    claq_outlier_factor: float = 13.0  # |w| > factor * mean|W| counts as an outlier (column ranking)
    claq_outlier_frac: float = 0.0  # share of entries kept in fp16 (outlier reservation), e.g. 0.005
    claq_share: int = 1  # columns per codebook; > 1: shared codebooks fixed up front, H_jj-weighted
    claq_codebook_bits: int = 8  # 8: uint8 entries + fp16 (lo, step) per codebook; 16: fp16 values
    claq_row_scale: bool = True  # fp16 per-row scale (RMS), codebooks on row-normalised values
    claq_scale_group: int = -1  # row scales per group of this many columns (-1: one per row)
    claq_kmeans_iters: int = 20  # Lloyd steps of the batched per-block K-means
    claq_refine_iters: int = 4  # Lloyd steps on each column's up-to-date values when the sweep reaches it
    claq_entropy_lambda: float = 0.0  # > 0: entropy-constrained codes (rate weighed against distortion)
    claq_hessian_weight: bool = True  # shared codebooks: weight each column's values by H_jj
    # distillation tuning (tune.py): after the solver, move codebook values / row scales / group scales
    # (codes fixed, size unchanged) so the model's next-token distribution matches the original's
    tune_steps: int = 0  # Adam steps on the calibration windows; 0 = off
    tune_lr: float = 1e-3  # per step, relative to each tensor's mean magnitude
    tune_batch: int = 4  # calibration windows per step
    # grid: shrink the min-max range by up to max_shrink in clip_search steps (0 = plain min-max)
    clip_search: int = 20
    max_shrink: float = 0.3
    # affine grids' fp16 scales keep this many of fp16's 10 mantissa bits (the rest zero): fewer bits
    # compress under a codec (relative scale error <= 2**-(bits + 1)); the packed file stays fp16
    scale_bits: int = 10
    # calibration
    calib: str | None = None  # text / JSONL path; None = the C4 sample shipped in the package
    calib_samples: int = 128
    calib_seqlen: int = 512
    seed: int = 0
    batch_size: int = 16  # calibration windows per forward chunk
    reuse_activations: bool = True  # serve unchanged submodule outputs between stages (memory for speed)
    # what to quantize
    skip: tuple[str, ...] = ("lm_head",)  # module-name suffixes left in 16 bit
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise RdquantError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.bits not in BITS:
            raise RdquantError(f"unsupported bit width {self.bits}; choose one of {BITS}")
        if self.group_size != -1 and (self.group_size < 8 or self.group_size % 2):
            raise RdquantError(
                f"unsupported group size {self.group_size}; use -1 (per row) or an even number >= 8"
            )
        if not 1 <= self.scale_bits <= 10:
            raise RdquantError("--scale-bits must be in 1..10 (mantissa bits of the fp16 scales)")
        if self.method == "ecsq" and not (self.target_coded_bits and 0.5 <= self.target_coded_bits <= 7):
            raise RdquantError("method ecsq needs --target-coded-bits between 0.5 and 7")
        if self.target_bits is not None and not 0.1 <= self.target_bits <= 16:
            raise RdquantError("--target-bits must be between 0.1 and 16 bits per weight")
        targets = [t for t in (self.target_bits, self.target_size, self.target_size_total) if t is not None]
        if len(targets) > 1:
            raise RdquantError("give one of --target-bits, --target-size and --target-size-total")
        if self.target_bits is not None and self.method not in ("claq", "cvxq"):
            raise RdquantError(f"--target-bits is not supported by method {self.method}; use --bits")
        if (self.target_size is not None or self.target_size_total is not None) and self.method != "cvxq":
            raise RdquantError("--target-size / --target-size-total need --method cvxq")
        if any(t is not None and t <= 0 for t in (self.target_size, self.target_size_total)):
            raise RdquantError("target sizes must be positive byte counts")
        if self.method == "cvxq" and not targets:
            raise RdquantError("method cvxq needs --target-bits, --target-size or --target-size-total")
        if self.cvxq_solver not in ("gptq", "rtn", "claq") or self.cvxq_sensitivity not in ("gradient", "fisher", "hessian"):
            raise RdquantError("cvxq: solver must be gptq, rtn or claq; sensitivity gradient, fisher or hessian")
        if not (self.cvxq_min_bits == -1 or 0 <= self.cvxq_min_bits <= self.cvxq_max_bits):
            raise RdquantError("cvxq: need 0 <= min bits <= max bits (or -1: automatic)")
        if not 1 <= self.cvxq_max_bits <= 8 or min(self.cvxq_samples, self.cvxq_components, self.cvxq_stride, self.cvxq_batch) < 1:
            raise RdquantError("cvxq: max bits in 1..8; samples, components, stride and batch >= 1")
        if self.cvxq_cells not in ("group", "cluster"):
            raise RdquantError("cvxq: cells must be group or cluster")
        if self.cvxq_grid not in ("uniform", "laplace"):
            raise RdquantError("cvxq: grid must be uniform or laplace")
        if self.cvxq_grid == "laplace" and (self.cvxq_cells != "cluster" or self.cvxq_solver == "claq"):
            raise RdquantError("cvxq: the laplace (companded) grid needs cluster cells and the gptq or rtn solver")
        if self.cvxq_cells == "cluster" and self.cvxq_cell_group not in (0,):
            raise RdquantError("cvxq: cvxq_cell_group applies to group cells only")
        if self.cvxq_rate not in ("stored", "coded"):
            raise RdquantError("cvxq: rate must be stored or coded")
        if self.cvxq_rate == "coded" and self.cvxq_solver == "claq":
            raise RdquantError("cvxq: --rate coded needs a uniform grid (solver gptq or rtn); CLAQ's K-means codes "
                               "use their levels nearly evenly, so their coded size is their stored size")
        if self.cvxq_kappa not in ("grid", "gauss"):
            raise RdquantError("cvxq: kappa must be grid or gauss")
        if self.cvxq_cell_group not in (0, -1) and (self.group_size == -1 or self.cvxq_cell_group % self.group_size):
            raise RdquantError("cvxq: the width cell (cvxq_cell_group) must be 0, -1 or a multiple of the group size")
        if self.method == "cvxq" and self.cvxq_solver == "claq" and self.claq_share != 1:
            raise RdquantError("cvxq with the claq solver allocates per column: use claq_share 1")
        if self.claq_high_bits not in (0, *BITS) or self.claq_share < 1 or not 0 <= self.claq_outlier_frac < 0.5:
            raise RdquantError("claq: need high bits 0 (low + 1) or 2..8, share >= 1 and outlier fraction in [0, 0.5)")
        if self.claq_scale_group != -1 and (self.claq_scale_group < 8 or self.claq_scale_group % 8):
            raise RdquantError("claq: scale group must be -1 (per row) or a multiple of 8")
        if self.claq_policy not in ("outlier", "rd"):
            raise RdquantError("claq: policy must be outlier or rd")
        if not 0 <= self.claq_entropy_lambda <= 100:
            raise RdquantError("claq: entropy lambda must be in [0, 100] (0: plain nearest-centroid codes)")
        if self.claq_codebook_bits not in (8, 16):
            raise RdquantError("claq: codebook bits must be 8 or 16")
        if self.claq_kmeans_iters < 1 or self.claq_refine_iters < 0 or self.claq_outlier_factor <= 0:
            raise RdquantError("claq: need kmeans iters >= 1, refine iters >= 0 and outlier factor > 0")
        if self.tune_steps < 0 or not self.tune_lr > 0 or self.tune_batch < 1:
            raise RdquantError("tune: need steps >= 0, lr > 0 and batch >= 1")
        if not 0 <= self.damp_percent < 1:
            raise RdquantError("damp_percent must be in [0, 1)")
        if self.calib_samples < 1 or self.calib_seqlen < 8:
            raise RdquantError("need calib_samples >= 1 and calib_seqlen >= 8")
        if self.block_size < 1 or self.batch_size < 1:
            raise RdquantError("block_size and batch_size must be positive")
        object.__setattr__(self, "skip", tuple(self.skip))

    def replace(self, **changes: Any) -> "CompressConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["skip"] = list(self.skip)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CompressConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise RdquantError(f"unknown recipe keys: {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "CompressConfig":
        """Read a recipe: a YAML mapping of CompressConfig fields (optionally under `compress:`)."""
        p = Path(path)
        if not p.is_file():
            raise RdquantError(f"recipe not found: {p}")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise RdquantError(f"recipe {p} must be a YAML mapping")
        return cls.from_dict(data.get("compress", data))


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
