"""Entropy-constrained scalar quantization (ECSQ) inside GPTQ: the rate is the *coded* size.

Instead of a few levels stretched over each group's range (fixed rate), use a fine symmetric uniform
grid, step Delta_g = alpha * rms(w_g) per group, and let the entropy coder (codecs.py) pay only for
the levels actually used. At high rate a uniform quantizer plus ideal entropy coding is within ~0.25
bit of the rate-distortion bound, while fixed-rate grids pay more. One global alpha (equal relative
step everywhere) is set so that the coded size meets `target_coded_bits`:

  * before the pipeline, alpha_0 is found by bisection on the round-to-nearest entropy of all
    weights plus side information;
  * during it, a rate controller corrects alpha for the remaining layers using the high-rate law
    bits(alpha) ~= bits(alpha_0) - n log2(alpha / alpha_0) and the measured excess of GPTQ's codes
    over round-to-nearest (error feedback spreads the codes a little).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..config import CompressConfig
from ..qtensor import QuantizedWeight, expand_groups, num_groups
from ..grid import quantize
from .gptq import gptq_quantize

SCALE_BITS = 16  # one fp16 step per group
TABLE_BITS = 32  # per symbol up to the largest used, per coded tensor: the ANS count table (codecs.py)
PAYLOAD_BITS = 8 * (16 + 8)  # per coded tensor: payload header and the coder's final state


def ecsq_bits(cfg: CompressConfig) -> int:
    """Alphabet width: wide enough that nothing clips. A weight can reach sqrt(group size) x the
    group's rms (one outlier), i.e. ~11 steps of rms at group 128; at the step sizes of 2-4 coded
    bits (0.3-0.9 rms) that needs about +-32 levels. Unused levels cost no coded bits."""
    return min(8, max(cfg.bits, math.ceil(cfg.target_coded_bits or 3) + 3))


def ecsq_grid(W: torch.Tensor, bits: int, group_size: int, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales, zeros) [out, n_groups]: step alpha * rms of each group (fp16), symmetric zero."""
    out_f, in_f = W.shape
    g = in_f if group_size == -1 else group_size
    n_g = num_groups(in_f, group_size)
    rms = torch.stack(
        [W[:, k * g : min((k + 1) * g, in_f)].square().mean(dim=1).sqrt() for k in range(n_g)], dim=1
    )
    scale = (alpha * rms).clamp(min=1e-7).to(torch.float16).to(torch.float32)
    zero = torch.full_like(scale, float(1 << (bits - 1)))
    return scale, zero


def coded_bits(codes: torch.Tensor, n_groups_total: int, n_tensors: int = 1) -> float:
    """Estimated coded size in bits: order-0 entropy of the codes, the fp16 steps, and one
    frequency table per coded tensor."""
    counts = torch.bincount(codes.reshape(-1).to(torch.int64)).double()
    p = counts[counts > 0] / counts.sum()
    entropy = float(-(p * torch.log2(p)).sum()) * codes.numel()
    return entropy + SCALE_BITS * n_groups_total + (TABLE_BITS * len(counts) + PAYLOAD_BITS) * n_tensors


def rtn_coded_bits(W: torch.Tensor, bits: int, group_size: int, alpha: float, n_tensors: int = 1) -> float:
    s, z = ecsq_grid(W, bits, group_size, alpha)
    in_f = W.shape[1]
    codes = quantize(W, expand_groups(s, in_f, group_size), expand_groups(z, in_f, group_size), bits)
    return coded_bits(codes, s.numel(), n_tensors)


@dataclass
class RateControl:
    """Keeps the running coded size on course for `target` bits per weight over `total` weights."""

    target: float
    total: int
    alpha0: float
    rtn_bits_total: float  # round-to-nearest coded bits of all weights at alpha0
    done_weights: int = 0
    done_bits: float = 0.0
    done_rtn_bits: float = 0.0  # their round-to-nearest bits at alpha0
    excess: float = 0.0  # sum over done matrices of (actual - predicted) bits
    history: list[tuple[float, float]] = field(default_factory=list)  # (alpha, bits/weight) per matrix

    def alpha(self) -> float:
        n_rem = self.total - self.done_weights
        if n_rem <= 0:
            return self.alpha0
        budget = self.target * self.total - self.done_bits
        rtn_rem = self.rtn_bits_total - self.done_rtn_bits
        delta = self.excess / max(self.done_weights, 1)
        return self.alpha0 * 2.0 ** ((rtn_rem + delta * n_rem - budget) / n_rem)

    def record(self, alpha: float, rtn_bits_at_alpha0: float, actual_bits: float, n: int) -> None:
        predicted = rtn_bits_at_alpha0 - n * math.log2(alpha / self.alpha0)
        self.excess += actual_bits - predicted
        self.done_weights += n
        self.done_bits += actual_bits
        self.done_rtn_bits += rtn_bits_at_alpha0
        self.history.append((alpha, actual_bits / n))


def plan_rate(weights: list[torch.Tensor], cfg: CompressConfig) -> RateControl:
    """alpha_0 by bisection on log2(alpha) so that round-to-nearest lands on the target."""
    bits = ecsq_bits(cfg)
    total = sum(w.numel() for w in weights)

    def rate(alpha: float) -> float:
        return sum(rtn_coded_bits(w.float(), bits, cfg.group_size, alpha) for w in weights) / total

    lo, hi = -8.0, 4.0  # log2 alpha
    for _ in range(18):
        mid = (lo + hi) / 2
        if rate(2.0**mid) > cfg.target_coded_bits:
            lo = mid
        else:
            hi = mid
    alpha0 = 2.0**hi
    return RateControl(cfg.target_coded_bits, total, alpha0, rate(alpha0) * total)


def ecsq_quantize(
    W: torch.Tensor, H: torch.Tensor, cfg: CompressConfig, rate: RateControl, n_parts: int = 1
) -> tuple[QuantizedWeight, list[str]]:
    """GPTQ on the ECSQ grid at the rate controller's current step (W may stack n_parts layers)."""
    bits = ecsq_bits(cfg)
    alpha = rate.alpha()
    grid = ecsq_grid(W.float(), bits, cfg.group_size, alpha)
    qcfg = cfg.replace(bits=bits, symmetric=True) if cfg.bits != bits else cfg.replace(symmetric=True)
    qw, notes = gptq_quantize(W, H, qcfg, grid=grid)
    actual = coded_bits(qw.codes, qw.scales.numel(), n_parts)
    rate.record(alpha, rtn_coded_bits(W.float(), bits, cfg.group_size, rate.alpha0, n_parts), actual, W.numel())
    notes.append(f"ecsq step {alpha:.4f} x rms, {actual / W.numel():.3f} coded bits/weight (estimate)")
    return qw, notes
