"""The column-codebook layout (CLAQ and any method with per-column widths; docs/FORMAT.md).

A weight W (out x in) is stored as
    W[r, c] = codebook[offset(c) + codes[r, c]] * row_scale[r, c // scale_group]   (optional, else 1)
except at the reserved outliers, which are stored exactly (fp16) and overwrite the codebook value.
Columns are taken `share` at a time (share = 1: one codebook per column); codebook group k has width
widths[k] in 0..8 bits and 2**widths[k] entries, laid end to end in `codebook`: fp16 values, or
uint8 entries e with a per-codebook fp16 (lo, step) in `codebook_range`, value = lo + step * e. Codes are
bit-packed per width: all columns of width 1 (row-major over [out, those columns]), then width 2, ...
A width-0 group has one entry and no code bits. Outliers are column-compressed: per-column counts,
then row indices and fp16 values sorted by (column, row).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import packing
from .qtensor import VariableWidth

STORED = ("qweight", "widths", "codebook", "codebook_range", "row_scale", "outlier_count", "outlier_row", "outlier_val")


def compact_codebooks(cb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """8-bit codebooks: rows of cb [B, k] (inf = unused slot) -> (values as stored, fp16 lo, fp16 step).
    Entries are e = round((v - lo) / step) in 0..255 with lo = min, step = (max - lo) / 255."""
    fin = torch.isfinite(cb)
    lo = torch.where(fin, cb, float("inf")).min(1).values
    hi = torch.where(fin, cb, -float("inf")).max(1).values
    lo = torch.where(torch.isfinite(lo), lo, 0.0).to(torch.float16)
    hi = torch.where(torch.isfinite(hi), hi, 0.0)
    step = ((hi - lo.float()) / 255).to(torch.float16)
    vals = codebook_values(entries_of(cb, lo, step), lo[:, None], step[:, None])
    return torch.where(fin, vals, cb), lo, step


def entries_of(v: torch.Tensor, lo: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """uint8 entries of values v [B, k] on the grid lo + step * e (lo, step: fp16 [B])."""
    st = step.float()[:, None]
    e = torch.where(st > 0, (v - lo.float()[:, None]) / torch.where(st > 0, st, 1.0), 0.0)
    return torch.nan_to_num(e, nan=0.0, posinf=0.0, neginf=0.0).round().clamp(0, 255).to(torch.uint8)


def codebook_values(entries: torch.Tensor, lo: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """The one formula for 8-bit codebook values, float32: lo + step * e."""
    return lo.to(torch.float32) + step.to(torch.float32) * entries.to(torch.float32)


def index_dtype(n: int) -> torch.dtype:
    """Smallest signed integer dtype that holds indices/counts up to n."""
    return torch.int16 if n < 2**15 else torch.int32


def column_widths(widths: torch.Tensor, share: int, in_features: int) -> torch.Tensor:
    return widths.to(torch.long).repeat_interleave(share)[:in_features]


def column_offsets(widths: torch.Tensor, share: int, in_features: int) -> torch.Tensor:
    """Offset of every column's codebook in the flat codebook array."""
    sizes = torch.ones_like(widths, dtype=torch.long) << widths.to(torch.long)
    starts = torch.cumsum(sizes, 0) - sizes
    return starts.repeat_interleave(share)[:in_features]


def pack_segments(codes: torch.Tensor, col_widths: torch.Tensor) -> torch.Tensor:
    """Codes [out, in] -> one uint8 stream: the columns of each width (ascending), each packed."""
    parts = []
    for b in sorted(set(col_widths.tolist())):
        if b == 0:
            continue
        cols = torch.nonzero(col_widths == b).flatten()
        parts.append(packing.pack(codes[:, cols].contiguous(), b))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8)


def unpack_segments(qweight: torch.Tensor, col_widths: torch.Tensor, out_features: int) -> torch.Tensor:
    """Inverse of pack_segments: codes [out, in] uint8."""
    in_f = col_widths.numel()
    widths = sorted(set(col_widths.tolist()))
    if len(widths) == 1 and widths[0] > 0:  # every column one width: one packed run, no scatter
        n = packing.packed_nbytes(out_features * in_f, widths[0])
        if n != qweight.numel():
            raise ValueError(f"qweight has {qweight.numel()} bytes, its widths say {n}")
        return packing.unpack(qweight, widths[0], out_features * in_f).view(out_features, in_f)
    codes = torch.zeros(out_features, in_f, dtype=torch.uint8, device=qweight.device)
    pos = 0
    for b in widths:
        if b == 0:
            continue
        cols = torch.nonzero(col_widths == b).flatten().to(qweight.device)
        n = packing.packed_nbytes(out_features * cols.numel(), b)
        if pos + n > qweight.numel():
            raise ValueError("qweight is shorter than its widths say")
        codes[:, cols] = packing.unpack(qweight[pos : pos + n], b, out_features * cols.numel()).view(out_features, -1)
        pos += n
    if pos != qweight.numel():
        raise ValueError(f"qweight has {qweight.numel()} bytes, its widths say {pos}")
    return codes


@dataclass
class CodebookWeight(VariableWidth):
    """Codes, per-column (or per column group) codebooks, optional row scales, fp16 outliers."""

    codes: torch.Tensor  # [out, in] uint8
    widths: torch.Tensor  # [n_codebooks] uint8
    codebook: torch.Tensor  # [sum 2**widths] float16, or uint8 entries with codebook_range
    share: int = 1
    row_scale: torch.Tensor | None = None  # [out, n_scale_groups] float16
    outlier_count: torch.Tensor | None = None  # [in] per column
    outlier_row: torch.Tensor | None = None  # [n] sorted by (column, row)
    outlier_val: torch.Tensor | None = None  # [n] float16
    codebook_range: torch.Tensor | None = None  # [n_codebooks, 2] float16 (lo, step) of 8-bit codebooks
    scale_group: int = -1  # columns per row scale (-1: one per row)

    layout = "codebook"

    @property
    def group_size(self) -> int:
        return self.share

    @property
    def n_outliers(self) -> int:
        return 0 if self.outlier_val is None else int(self.outlier_val.numel())

    def mean_width(self) -> float:
        return float(column_widths(self.widths, self.share, self.shape[1]).float().mean())

    def spec(self) -> dict:
        """What the manifest records so the runtime can allocate the layer's buffers."""
        return {"layout": "codebook", "share": self.share, "row_scale": self.row_scale is not None,
                "codebook_bits": 16 if self.codebook_range is None else 8, "scale_group": self.scale_group,
                "outliers": self.n_outliers, "mean_width": round(self.mean_width(), 4)}

    def outlier_cols(self) -> torch.Tensor:
        assert self.outlier_count is not None
        return torch.repeat_interleave(
            torch.arange(self.shape[1], device=self.codes.device), self.outlier_count.to(torch.long)
        )

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Codebook values of `codes` [out, in] (before row scales and outliers), float32."""
        off = column_offsets(self.widths, self.share, self.shape[1]).to(codes.device)
        return self.values()[codes.to(torch.long) + off[None, :]]

    def values(self) -> torch.Tensor:
        """The flat codebook as float32 values."""
        if self.codebook_range is None:
            return self.codebook.to(torch.float32)
        sizes = torch.ones_like(self.widths, dtype=torch.long) << self.widths.to(torch.long)
        r = self.codebook_range.repeat_interleave(sizes.to(self.codebook_range.device), 0)
        return codebook_values(self.codebook, r[:, 0], r[:, 1])

    def finish(self, W: torch.Tensor) -> torch.Tensor:
        """Apply row scales and put the outliers back (in place on W, float32)."""
        if self.row_scale is not None:
            W.mul_(self.scales_full())
        if self.n_outliers:
            W[self.outlier_row.to(torch.long), self.outlier_cols()] = self.outlier_val.to(torch.float32)
        return W

    def scales_full(self) -> torch.Tensor:
        """Row scales broadcast to [out, in], float32."""
        from .qtensor import expand_groups

        return expand_groups(self.row_scale.to(torch.float32).reshape(self.shape[0], -1), self.shape[1], self.scale_group)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.finish(self.lookup(self.codes)).to(dtype)

    def round_to_grid(self, W: torch.Tensor) -> torch.Tensor:
        """W snapped, column by column, to the nearest entry of its own codebook (the same outliers
        kept): plain rounding on this grid, the "before" of the method's error compensation."""
        from .kmeans import nearest

        if W.device != self.codes.device:  # computed where W is (a pass on the host slowed CLAQ at 8B shapes)
            return self.to(W.device).round_to_grid(W)
        out_f, in_f = self.shape
        x = W.to(torch.float32)
        if self.row_scale is not None:
            x = x / self.scales_full()
        cw = column_widths(self.widths, self.share, in_f).to(W.device)
        off = column_offsets(self.widths, self.share, in_f).to(W.device)
        kmax = 1 << int(cw.max())
        slots = torch.arange(kmax, device=W.device)[None, :]
        idx = (off[:, None] + slots).clamp(max=self.codebook.numel() - 1)
        cb = self.values().to(W.device)[idx]
        cb = torch.where(slots < (1 << cw)[:, None], cb, float("inf"))
        cb = cb.sort(dim=1).values
        c = nearest(x.t().contiguous(), cb)  # [in, out]
        return self.finish(cb.gather(1, c).t().contiguous())

    def to(self, device: torch.device | str) -> "CodebookWeight":
        return CodebookWeight(**{f: (getattr(self, f).to(device) if isinstance(getattr(self, f), torch.Tensor) else getattr(self, f))
                                 for f in ("codes", "widths", "codebook", "share", "row_scale", "outlier_count",
                                           "outlier_row", "outlier_val", "codebook_range", "scale_group")})

    def rows(self, start: int, stop: int) -> "CodebookWeight":
        raise NotImplementedError("codebook weights are made per layer; stacked layers are never split")

    # --- packed form, as stored in the artifact ---------------------------------------------
    def packed_state(self) -> dict[str, torch.Tensor]:
        out_f, in_f = self.shape
        state = {
            "qweight": pack_segments(self.codes, column_widths(self.widths, self.share, in_f)),
            "widths": self.widths.to(torch.uint8).contiguous(),
            "codebook": (self.codebook.to(torch.float16) if self.codebook_range is None else self.codebook.to(torch.uint8)).contiguous(),
        }
        if self.codebook_range is not None:
            state["codebook_range"] = self.codebook_range.to(torch.float16).contiguous()
        if self.row_scale is not None:
            state["row_scale"] = self.row_scale.to(torch.float16).contiguous()
        if self.n_outliers:
            state["outlier_count"] = self.outlier_count.to(index_dtype(out_f)).contiguous()
            state["outlier_row"] = self.outlier_row.to(index_dtype(out_f)).contiguous()
            state["outlier_val"] = self.outlier_val.to(torch.float16).contiguous()
        return state

    @classmethod
    def from_packed(cls, state: dict[str, torch.Tensor], shape: tuple[int, int], share: int,
                    scale_group: int = -1) -> "CodebookWeight":
        out_f, in_f = shape
        widths = state["widths"]
        n_cb = -(-in_f // share)
        if widths.numel() != n_cb:
            raise ValueError(f"widths has {widths.numel()} entries, expected {n_cb}")
        if widths.numel() and int(widths.max()) > 8:
            raise ValueError("code widths above 8 bits")
        n_entries = int((torch.ones_like(widths, dtype=torch.long) << widths.to(torch.long)).sum())
        if state["codebook"].numel() != n_entries:
            raise ValueError(f"codebook has {state['codebook'].numel()} entries, widths say {n_entries}")
        codes = unpack_segments(state["qweight"], column_widths(widths, share, in_f), out_f)
        cw = column_widths(widths, share, in_f).to(codes.device)
        if codes.numel() and bool((codes.amax(0).to(torch.long) >= (1 << cw)).any()):
            raise ValueError("codes out of range for their column widths")
        w = cls(codes, widths, state["codebook"], share, state.get("row_scale"), scale_group=scale_group)
        if w.row_scale is not None:
            from .qtensor import num_groups

            if w.row_scale.numel() != out_f * num_groups(in_f, scale_group):
                raise ValueError(f"row_scale has {w.row_scale.numel()} values, expected {out_f * num_groups(in_f, scale_group)}")
        if "codebook_range" in state:
            if tuple(state["codebook_range"].shape) != (n_cb, 2):
                raise ValueError(f"codebook_range has shape {tuple(state['codebook_range'].shape)}, expected {(n_cb, 2)}")
            w.codebook_range = state["codebook_range"]
        if "outlier_val" in state and state["outlier_val"].numel():
            cnt, rows = state["outlier_count"], state["outlier_row"]
            if cnt.numel() != in_f or int(cnt.to(torch.long).sum()) != rows.numel() or rows.numel() != state["outlier_val"].numel():
                raise ValueError("outlier tensors disagree in size")
            if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= out_f):
                raise ValueError("outlier row index out of range")
            w.outlier_count, w.outlier_row, w.outlier_val = cnt, rows, state["outlier_val"]
        return w
