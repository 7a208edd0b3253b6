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

import torch
import torch.nn.functional as F
from torch import nn

from .grid import FP16_MANTISSA, store_scale
from .qcodebook import CodebookWeight, column_offsets, compact_codebooks, entries_of
from .qtensor import QuantizedWeight, expand_groups
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
    """One QuantLinear's free values as trainable offsets: weight() rebuilds W from them, commit()
    writes them back to the layer's stored tensors."""

    def __init__(self, m: QuantLinear) -> None:
        self.m = m
        qw = m.quantized_weight()
        self.qw = qw
        dev = m.qweight.device
        if isinstance(qw, CodebookWeight):
            in_f = qw.shape[1]
            self.idx = qw.codes.to(torch.long) + column_offsets(qw.widths, qw.share, in_f).to(dev)[None, :]
            self.base = {"values": qw.values().to(dev)}
            if qw.row_scale is not None:
                self.base["row_scale"] = qw.row_scale.to(torch.float32)
            self.outliers = None
            if qw.n_outliers:
                self.outliers = (qw.outlier_row.to(torch.long), qw.outlier_cols().to(dev), qw.outlier_val.to(torch.float32))
        elif isinstance(qw, QuantizedWeight):
            in_f = qw.shape[1]
            self.q = qw.codes.to(torch.float32) - expand_groups(qw.zero_points().to(torch.float32), in_f, qw.group_size)
            self.base = {"scales": qw.scales.to(torch.float32)}
        else:
            raise TypeError(f"no tunable values in a {type(qw).__name__}")
        # offsets in units of each tensor's mean magnitude, so one learning rate suits every tensor
        self.unit = {k: float(v.abs().mean().clamp_min(1e-8)) for k, v in self.base.items()}
        self.delta = {k: nn.Parameter(torch.zeros_like(v)) for k, v in self.base.items()}

    def current(self, key: str) -> torch.Tensor:
        return self.base[key] + self.delta[key] * self.unit[key]

    def weight(self) -> torch.Tensor:
        qw = self.qw
        if isinstance(qw, CodebookWeight):
            W = self.current("values")[self.idx]
            if "row_scale" in self.base:
                W = W * expand_groups(self.current("row_scale").reshape(qw.shape[0], -1), qw.shape[1], qw.scale_group)
            if self.outliers is not None:
                r, c, v = self.outliers
                W = W.index_put((r, c), v)
            return W
        return self.q * expand_groups(self.current("scales"), qw.shape[1], qw.group_size)

    @torch.no_grad()
    def commit(self, scale_bits: int = FP16_MANTISSA) -> None:
        """Round the tuned values to their stored form (group scales to `scale_bits` mantissa bits, as the
        grid made them) and put them in the layer."""
        qw, new = self.qw, {}
        if isinstance(qw, CodebookWeight):
            v = self.current("values")
            if qw.codebook_range is None:
                new["codebook"] = v.to(torch.float16)
            else:  # 8-bit entries on a fresh per-codebook (lo, step) grid
                sizes = (torch.ones_like(qw.widths, dtype=torch.long) << qw.widths.to(torch.long)).to(v.device)
                starts = torch.cumsum(sizes, 0) - sizes
                kmax = int(sizes.max())
                slot = torch.arange(kmax, device=v.device)[None, :]
                valid = slot < sizes[:, None]
                pos = (starts[:, None] + slot).clamp(max=v.numel() - 1)
                padded = torch.where(valid, v[pos], float("inf"))
                _, lo, step = compact_codebooks(padded)
                new["codebook"] = entries_of(padded, lo, step)[valid]
                new["codebook_range"] = torch.stack([lo, step], 1)
            if "row_scale" in self.base:
                new["row_scale"] = self.current("row_scale").to(torch.float16).reshape(qw.row_scale.shape)
        else:
            new["scales"] = store_scale(self.current("scales"), scale_bits).to(torch.float16)
        self.m.set_tensors(new)


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
    tunables = [_Tunable(m) for m in student.modules() if isinstance(m, QuantLinear) and m.layout != "mixed"]
    params = [p for t in tunables for p in t.delta.values()]
    n_params = sum(p.numel() for p in params)
    frozen = [p for p in student.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    teacher.eval()
    student.eval()
    for t in tunables:  # route each layer's forward through its trainable weight
        t.m.forward = types.MethodType(
            lambda m, x, t=t: F.linear(x, t.weight().to(x.dtype), None if m.bias is None else m.bias.to(x.dtype)), t.m)
    try:
        kl_before = _mean_kl(student, teacher, held, batch) if holdout else float("nan")
        if steps > 0 and params:
            opt = torch.optim.Adam(params, lr=lr)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / steps)))
            gen = torch.Generator().manual_seed(seed)
            order = torch.empty(0, dtype=torch.long)
            bar = _progress(steps, progress)
            for _ in range(steps):
                if order.numel() < batch:
                    order = torch.cat([order, torch.randperm(train.shape[0], generator=gen)])
                pick, order = order[:batch], order[batch:]
                x = train[pick.to(dev)]
                with torch.no_grad():
                    t_logits = teacher(x).logits
                loss = _kl(student(x).logits, t_logits)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if bar is not None:
                    bar.set_postfix(kl=f"{float(loss):.4f}")
                    bar.update(1)
            if bar is not None:
                bar.close()
    finally:
        for t in tunables:
            del t.m.forward
        for p in frozen:
            p.requires_grad_(True)
    for t in tunables:
        t.commit(scale_bits)
    kl_after = _mean_kl(student, teacher, held, batch) if holdout else float("nan")  # as stored
    return TuneLog(steps, len(tunables), n_params, kl_before, kl_after, time.perf_counter() - t0)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="tune", unit="step")
