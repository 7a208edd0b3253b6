"""Distillation tuning of a compressed model's continuous quantization parameters.

After the solver has fixed every code, the values the codes point at are still free: a codebook
layer's codebook entries and row scales, an affine layer's group scales. `tune` moves them (Adam, a
relative step per tensor) so the compressed model's next-token distribution matches the original's
(KL divergence on the calibration windows), then writes them back in their stored form (fp16, or 8-bit
entries on a per-codebook fp16 grid). Codes, widths, zero points and outliers are untouched, so the
artifact's size does not change. Layers of other layouts are left as they are.
"""

from __future__ import annotations

import math
import time
import types
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .grid import FP16_MANTISSA
from .layouts.base import Tuning
from .lowrank import AdapterTuning
from .runtime import QuantLinear


@dataclass
class TuneLog:
    """What tuning did: steps, the KL divergence before/after on held-out calibration windows."""

    steps: int
    tuned_layers: int
    parameters: int
    kl_before: float
    kl_after: float
    seconds: float

    def to_dict(self) -> dict:
        return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in asdict(self).items()}


class _Tunable:
    """One QuantLinear's free values (its layout's `tuning`) as trainable offsets: weight() rebuilds W
    from them, commit() writes them back to the layer's stored tensors."""

    def __init__(self, m: QuantLinear, tuning: Tuning) -> None:
        self.m, self.tuning = m, tuning
        self.base = tuning.base
        # offsets in units of each tensor's mean magnitude, so one learning rate suits every tensor
        self.unit = {k: float(v.abs().mean().clamp_min(1e-8)) for k, v in self.base.items()}
        self.delta = {k: nn.Parameter(torch.zeros_like(v)) for k, v in self.base.items()}

    def current(self) -> dict[str, torch.Tensor]:
        return {k: self.base[k] + self.delta[k] * self.unit[k] for k in self.base}

    def weight(self) -> torch.Tensor:
        return self.tuning.weight(self.current())

    @torch.no_grad()
    def commit(self, scale_bits: int = FP16_MANTISSA) -> None:
        """Round the tuned values to their stored form (group scales to `scale_bits` mantissa bits, as the
        grid made them) and put them in the layer."""
        self.m.set_tensors(self.tuning.stored(self.current(), scale_bits))


def tunables(model: nn.Module) -> list[_Tunable]:
    """Every decoder-block QuantLinear whose layout has values to tune (mixed-width layers have none yet;
    the quantized embedding and head stay as solved), or whose low-rank adapters do."""
    out = []
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.kind == "linear":
            lowrank = m.low_rank()  # a layer with low-rank adapters tunes them alone (SLiM's adapter fine-tune)
            tuning = (AdapterTuning(m.quantized_weight().dequantize(torch.float32), lowrank) if lowrank is not None
                      else m.layout.tuning(m.quantized_weight()))
            if tuning is not None:
                out.append(_Tunable(m, tuning))
    return out


def _kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student)."""
    s = F.log_softmax(student_logits.float(), -1).flatten(0, -2)
    t = F.log_softmax(teacher_logits.float(), -1).flatten(0, -2)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def _mean_kl(student: nn.Module, teacher: nn.Module, ids: torch.Tensor, batch: int) -> float:
    total = 0.0
    with torch.no_grad():
        for i in range(0, ids.shape[0], batch):
            x = ids[i:i + batch]
            total += float(_kl(student(x).logits, teacher(x).logits)) * x.shape[0]
    return total / max(ids.shape[0], 1)


class _Routed:
    """While open, each tunable layer's forward computes with its trainable weight (the previous forward,
    e.g. activation reuse's wrapper, is put back on exit) and every other parameter of `root` is frozen."""

    def __init__(self, root: nn.Module, layers: list[_Tunable]) -> None:
        self.root, self.layers = root, layers

    def __enter__(self) -> "_Routed":
        self.frozen = [p for p in self.root.parameters() if p.requires_grad]
        for p in self.frozen:
            p.requires_grad_(False)
        self.saved = [t.m.__dict__.get("forward") for t in self.layers]
        for t in self.layers:
            t.m.forward = types.MethodType(
                lambda m, x, t=t: F.linear(x, t.weight().to(x.dtype), None if m.bias is None else m.bias.to(x.dtype)), t.m)
        return self

    def __exit__(self, *exc) -> None:
        for t, f in zip(self.layers, self.saved):
            if f is None:
                del t.m.forward
            else:
                t.m.forward = f
        for p in self.frozen:
            p.requires_grad_(True)


def _optimise(layers: list[_Tunable], steps: int, lr: float, loss_at: Callable[[], torch.Tensor], bar=None) -> None:
    """Adam with a cosine schedule on the layers' offsets, `loss_at()` giving each step's loss."""
    params = [p for t in layers for p in t.delta.values()]
    if steps <= 0 or not params:
        return
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / steps)))
    for _ in range(steps):
        loss = loss_at()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if bar is not None:
            bar.set_postfix(loss=f"{float(loss):.4g}")
            bar.update(1)


def _sampler(n: int, batch: int, seed: int) -> Callable[[], torch.Tensor]:
    """Indices of the next `batch` items of a reshuffled pass over n items (a fresh permutation each pass)."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)

    def pick() -> torch.Tensor:
        nonlocal order
        if order.numel() < batch:
            order = torch.cat([order, torch.randperm(n, generator=gen)])
        out, order = order[:batch], order[batch:]
        return out

    return pick


def tune(
    student: nn.Module,
    teacher: nn.Module,
    calib_ids: torch.Tensor,
    steps: int,
    lr: float = 1e-3,
    batch: int = 8,
    holdout: int = 8,
    seed: int = 0,
    progress: bool = True,
    scale_bits: int = FP16_MANTISSA,
) -> TuneLog:
    """Distil `teacher` (the original model) into `student` (QuantLinear layers) by moving only the
    stored continuous values; `holdout` calibration windows are kept out to report the KL before/after."""
    t0 = time.perf_counter()
    dev = next(student.parameters()).device
    ids = calib_ids.to(dev)
    if ids.shape[0] <= holdout:
        holdout = 0
    held, train = ids[:holdout], ids[holdout:]
    layers = tunables(student)
    n_params = sum(p.numel() for t in layers for p in t.delta.values())
    teacher.eval()
    student.eval()
    pick = _sampler(train.shape[0], batch, seed)

    def loss_at() -> torch.Tensor:
        x = train[pick().to(dev)]
        with torch.no_grad():
            t_logits = teacher(x).logits
        return _kl(student(x).logits, t_logits)

    with _Routed(student, layers):
        kl_before = _mean_kl(student, teacher, held, batch) if holdout else float("nan")
        bar = _progress(steps, progress) if layers else None
        _optimise(layers, steps, lr, loss_at, bar)
        if bar is not None:
            bar.close()
    for t in layers:
        t.commit(scale_bits)
    kl_after = _mean_kl(student, teacher, held, batch) if holdout else float("nan")  # as stored
    return TuneLog(steps, len(layers), n_params, kl_before, kl_after, time.perf_counter() - t0)


def block_error(block_out: Callable[[int], torch.Tensor], targets: list[torch.Tensor], k: int) -> torch.Tensor:
    """Relative squared error ||y - y*||^2 / ||y*||^2 of chunk k's block output against its target."""
    y = block_out(k).float()
    t = targets[k].to(y.device).float()
    return (y - t).square().sum() / t.square().sum().clamp_min(1e-30)


def tune_block(block: nn.Module, block_out: Callable[[int], torch.Tensor], targets: list[torch.Tensor], steps: int,
               lr: float = 1e-3, seed: int = 0, scale_bits: int = FP16_MANTISSA) -> dict:
    """Block-wise distillation (--tune-scope block): move the block's free values so that its output on
    each calibration chunk (`block_out(k)`, the quantized block on its own inputs) matches `targets[k]`,
    the float block's output on the same inputs. Needs one block in memory, so it runs inside the
    streamed pipeline at any model size. Returns the relative error on chunk 0 before / after (stored)."""
    t0 = time.perf_counter()
    layers = tunables(block)
    if not layers or steps <= 0:
        return {"tuned_layers": 0}
    pick = _sampler(len(targets), 1, seed)
    with _Routed(block, layers):
        with torch.no_grad():
            before = float(block_error(block_out, targets, 0))
        _optimise(layers, steps, lr, lambda: block_error(block_out, targets, int(pick()[0])))
    for t in layers:
        t.commit(scale_bits)
    with torch.no_grad():
        after = float(block_error(block_out, targets, 0))
    return {"tuned_layers": len(layers), "parameters": sum(p.numel() for t in layers for p in t.delta.values()),
            "error_before": before, "error_after": after, "seconds": time.perf_counter() - t0}


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="tune", unit="step")
