"""llama.cpp's k-quant grids (Q2_K .. Q6_K) as an rdquant layout's weight, so GPTQ can solve in the very grid a
GGUF file stores and the export is a byte copy (issue: export).

A k-quant row is cut into super-blocks of 256 weights, each into sub-blocks of 16 or 32 with one small integer
scale (and, for the "min" types, one integer min) each; the super-block holds fp16 factors for them:

    Q2_K  w = d * sc * q - dmin * m   q 0..3,  sc, m 0..15 (4 bits),  sub-blocks of 16
    Q3_K  w = d * sc * (q - 4)        q 0..7,  sc -32..31 (6 bits),   sub-blocks of 16
    Q4_K  w = d * sc * q - dmin * m   q 0..15, sc, m 0..63 (6 bits),  sub-blocks of 32
    Q5_K  w = d * sc * q - dmin * m   q 0..31, sc, m 0..63 (6 bits),  sub-blocks of 32
    Q6_K  w = d * sc * (q - 32)       q 0..63, sc -128..127 (int8),   sub-blocks of 16

`KQuantWeight` keeps the codes [out, in] and those factors; its stored form is the GGUF blocks themselves (ggml's
byte layouts, checked against the `gguf` package's dequantizer in the tests). Values are computed as ggml does,
(d * sc) * q - dmin * m in float32, so rdquant's dequantized weight equals llama.cpp's bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QK = 256  # weights per super-block


@dataclass(frozen=True)
class KType:
    """One k-quant type: code width, weights per sub-block, min-based or centred, the largest sub-block
    scale (and min) magnitude, and the bytes of a 256-weight block."""

    name: str
    bits: int
    sub: int
    has_min: bool
    levels: int
    block_bytes: int

    @property
    def n_sub(self) -> int:
        return QK // self.sub

    @property
    def zero(self) -> int:
        """The code of 0 in the centred types (0 in the min types)."""
        return 0 if self.has_min else 1 << (self.bits - 1)

    @property
    def max_code(self) -> int:
        return (1 << self.bits) - 1


TYPES = {t.name: t for t in (
    KType("Q2_K", 2, 16, True, 15, 84),
    KType("Q3_K", 3, 16, False, 31, 110),
    KType("Q4_K", 4, 32, True, 63, 144),
    KType("Q5_K", 5, 32, True, 63, 176),
    KType("Q6_K", 6, 16, False, 127, 210),
)}
# the block-32 type llama.cpp falls back to for rows that are not whole super-blocks, as rdquant affine
# grids (bits, symmetric, scale mantissa bits): Q4_0, Q4_0 (llama.cpp: IQ4_NL, same size), Q5_0, Q5_1, Q8_0
FALLBACK = {"Q2_K": (4, True, 10), "Q3_K": (4, True, 10), "Q4_K": (5, True, 10), "Q5_K": (5, False, 5),
            "Q6_K": (8, True, 10)}


def ktype(name: str) -> KType:
    """The k-quant type called `name` (e.g. Q4_K), or a ValueError listing them."""
    try:
        return TYPES[name.upper()]
    except KeyError:
        raise ValueError(f"unknown k-quant type {name!r}; known: {', '.join(TYPES)}") from None


def _f16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


@dataclass
class KParams:
    """The factors of a k-quant grid: d [rows, n_sb] (fp16 values), dmin (min types), sc and m
    [rows, n_sb * n_sub] integers (as float32)."""

    d: torch.Tensor
    dmin: torch.Tensor | None
    sc: torch.Tensor
    m: torch.Tensor | None

    def step_offset(self, kt: KType) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) per sub-block [rows, n_subs]: w = a * q - b (min types) or a * (q - zero)."""
        d = self.d.repeat_interleave(kt.n_sub, dim=1)
        a = d * self.sc
        if kt.has_min:
            return a, self.dmin.repeat_interleave(kt.n_sub, dim=1) * self.m
        return a, torch.zeros_like(a)


def values(q: torch.Tensor, a: torch.Tensor, b: torch.Tensor, kt: KType) -> torch.Tensor:
    """Dequantized values of codes q on steps a and offsets b (broadcast), in ggml's order of operations."""
    if kt.has_min:
        return a * q - b
    return a * (q - kt.zero)


def codes_for(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, kt: KType) -> torch.Tensor:
    """The nearest codes of w on steps a and offsets b (broadcast), as float32."""
    safe = torch.where(a == 0, torch.ones_like(a), a)
    if kt.has_min:
        q = torch.round((w + b) / safe)
    else:
        q = torch.round(w / safe) + kt.zero
    q = torch.where(a == 0, torch.full_like(q, float(kt.zero)), q)
    return q.clamp(0, kt.max_code)


def fit(W: torch.Tensor, kt: KType, col_weight: torch.Tensor | None = None, clip_search: int = 20,
        max_shrink: float = 0.3) -> KParams:
    """The k-quant grid of W [rows, cols] (cols a multiple of 256): each sub-block's step (and offset) by
    rdquant's clip search (least col_weight-weighted squared error over shrinks of its range; centred types
    put the larger-magnitude side on the code range's longer end, as llama.cpp does) and a least-squares
    refit (_refit; min types also from the plain min-max start), then the super-block's fp16 factors and
    the integer sub-block scales (and mins) rounded from them."""
    from .grid import grid_params

    rows, cols = W.shape
    if cols % QK:
        raise ValueError(f"k-quants need rows of whole {QK}-weight super-blocks, got {cols} columns")
    n_sb = cols // QK
    W = W.to(torch.float32)
    sub = W.reshape(rows * cols // kt.sub, kt.sub)
    cw = (torch.ones(cols, device=W.device) if col_weight is None else col_weight.to(W.device, torch.float32).clamp_min(0))
    cw = cw.reshape(-1, kt.sub).repeat(rows, 1)
    if kt.has_min:  # two starts, each refitted: the clip search's grid (integer zero point) and the plain
        # min-max grid with a free offset (a sub-block already on a min-based grid is recovered exactly)
        s, z = grid_params(sub, kt.bits, False, clip_search, max_shrink, cw)
        a1, b1, e1 = _refit(sub, cw, s, z * s, kt)
        lo, hi = sub.min(1, keepdim=True).values.clamp(max=0), sub.max(1, keepdim=True).values.clamp(min=0)
        a2, b2, e2 = _refit(sub, cw, ((hi - lo) / kt.max_code).clamp_min(1e-12), -lo, kt)
        second = e2 < e1
        step, offset = torch.where(second, a2, a1).view(rows, -1), torch.where(second, b2, b1).view(rows, -1)
    else:
        s = _centred_steps(sub, kt, cw, clip_search, max_shrink)
        step = _refit(sub, cw, s, torch.zeros_like(s), kt)[0].view(rows, -1)
    per_sb = lambda t: t.view(rows, n_sb, kt.n_sub)
    d = _f16(per_sb(step).abs().amax(-1) / kt.levels)  # [rows, n_sb]
    ratio = torch.round(per_sb(step) / torch.where(d == 0, 1.0, d)[..., None])
    if kt.has_min:  # a step never rounds to 0: that would erase its sub-block
        sc = torch.where(per_sb(step) > 0, ratio.clamp(1, kt.levels), 0.0)
    else:
        sc = torch.where((ratio == 0) & (per_sb(step) != 0), torch.sign(per_sb(step)), ratio).clamp(-kt.levels - 1, kt.levels)
    sc = sc.reshape(rows, -1)
    if not kt.has_min:
        return KParams(d, None, sc, None)
    dmin = _f16(per_sb(offset).amax(-1) / kt.levels)
    m = torch.round(per_sb(offset) / torch.where(dmin == 0, 1.0, dmin)[..., None]).clamp(0, kt.levels).view(rows, -1)
    return KParams(d, dmin, sc, m)


def _refit(sub: torch.Tensor, cw: torch.Tensor, a: torch.Tensor, b: torch.Tensor, kt: KType, rounds: int = 2
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted least-squares steps (and offsets, min types) of each sub-block (rows of `sub`) for the codes the
    grid (a, b) gives, alternated with re-rounding `rounds` times; a sub-block keeps its grid where the refit does
    not lower its error. The clip search only scales the range; this moves step and offset freely (as llama.cpp's
    make_qkx2_quants does), which recovers a grid the weights already sit on. Returns (a, b, weighted error)."""
    err = lambda a_, b_: ((values(codes_for(sub, a_, b_, kt), a_, b_, kt) - sub).square() * cw).sum(1, keepdim=True)
    best = err(a, b)
    for _ in range(rounds):
        q = codes_for(sub, a, b, kt) - kt.zero  # w ~ a q - b
        sw, sq, sx = cw.sum(1, keepdim=True), (cw * q).sum(1, keepdim=True), (cw * sub).sum(1, keepdim=True)
        sqq, sqx = (cw * q * q).sum(1, keepdim=True), (cw * q * sub).sum(1, keepdim=True)
        if kt.has_min:  # minimise sum cw (a q - b - x)^2 over (a, b), b >= 0 (the stored min is unsigned)
            det = sw * sqq - sq * sq
            na = torch.where(det > 0, (sw * sqx - sq * sx) / det.clamp_min(1e-30), a)
            nb = (na * sq - sx) / sw.clamp_min(1e-30)  # the normal equations: b = a mean(q) - mean(x)
            neg = nb < 0
            na = torch.where(neg, sqx / sqq.clamp_min(1e-30), na)
            nb = nb.clamp_min(0)
        else:
            na, nb = torch.where(sqq > 0, sqx / sqq.clamp_min(1e-30), a), b
        na = torch.where(na > 0, na, a) if kt.has_min else torch.where(na != 0, na, a)
        e = err(na, nb)
        better = e < best
        a, b, best = torch.where(better, na, a), torch.where(better, nb, b), torch.where(better, e, best)
    return a, b, best


def _centred_steps(sub: torch.Tensor, kt: KType, cw: torch.Tensor, clip_search: int, max_shrink: float) -> torch.Tensor:
    """Signed step per sub-block (rows of `sub`) of a centred type: the weight of largest magnitude sits on
    code 0 (zero steps below the centre), shrunk by the factor with the least weighted squared error."""
    amax_idx = sub.abs().argmax(1, keepdim=True)
    peak = sub.gather(1, amax_idx)  # signed
    base = -peak / kt.zero  # code 0 <-> the peak
    best = base.clone()
    best_err = torch.full_like(base, float("inf"))
    n = max(clip_search, 0)
    for i in range(n + 1):
        s = base * (1.0 - max_shrink * i / n if n else 1.0)
        q = codes_for(sub, s, torch.zeros_like(s), kt)
        err = ((values(q, s, 0.0, kt) - sub).square() * cw).sum(1, keepdim=True)
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better, s, best)
    return best


# --- ggml's block layouts -----------------------------------------------------------------------
def _u16(x: torch.Tensor) -> torch.Tensor:
    """fp16 values [N] as their two little-endian bytes [N, 2] (uint8)."""
    return x.to(torch.float16).contiguous().view(torch.uint8).view(-1, 2)


def pack_blocks(q: torch.Tensor, p: KParams, kt: KType) -> torch.Tensor:
    """The GGUF blocks [rows, n_sb * block_bytes] (uint8) of codes q [rows, cols] on grid p."""
    rows, cols = q.shape
    n_sb = cols // QK
    N = rows * n_sb
    q = q.to(torch.int32).reshape(N, QK)
    sc = p.sc.to(torch.int32).reshape(N, kt.n_sub)
    d = _u16(p.d.reshape(N))
    u8 = lambda t: t.to(torch.uint8)
    if kt.name in ("Q4_K", "Q5_K"):
        m = p.m.to(torch.int32).reshape(N, 8)
        scales = torch.cat([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), m[:, :4] | ((m[:, 4:] >> 4) << 6),
                            (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)], 1)
        c = q.view(N, 4, 2, 32)  # chunks of 64: two sub-blocks of 32, low and high nibble
        qs = (c[:, :, 0] & 0xF) | ((c[:, :, 1] & 0xF) << 4)
        parts = [d, _u16(p.dmin.reshape(N)), u8(scales)]
        if kt.name == "Q5_K":
            hi = (c >> 4) & 1  # [N, 4, 2, 32]: bit 2 * chunk + half of byte l
            shift = (2 * torch.arange(4, device=q.device).view(1, 4, 1, 1) + torch.arange(2, device=q.device).view(1, 1, 2, 1))
            parts.append(u8((hi << shift).sum((1, 2))))
        parts.append(u8(qs.reshape(N, 128)))
    elif kt.name == "Q6_K":
        c = q.view(N, 2, 4, 32)  # halves of 128: quarters q1..q4 of 32
        ql = torch.cat([(c[:, :, 0] & 0xF) | ((c[:, :, 2] & 0xF) << 4), (c[:, :, 1] & 0xF) | ((c[:, :, 3] & 0xF) << 4)], 2)
        qh = ((c >> 4) << (2 * torch.arange(4, device=q.device).view(1, 1, 4, 1))).sum(2)
        parts = [u8(ql.reshape(N, 128)), u8(qh.reshape(N, 64)), sc.to(torch.int8).view(torch.uint8), d]
    else:  # Q2_K, Q3_K: element 128 n + 32 j + l -> byte 32 n + l, bits 2 j
        c = q.view(N, 2, 4, 32)
        qs = (((c & 3) << (2 * torch.arange(4, device=q.device).view(1, 1, 4, 1))).sum(2)).reshape(N, 64)
        if kt.name == "Q2_K":
            parts = [u8(sc | (p.m.to(torch.int32).reshape(N, 16) << 4)), u8(qs), d, _u16(p.dmin.reshape(N))]
        else:
            hm = (((c >> 2) & 1) << torch.arange(8, device=q.device).view(1, 2, 4, 1)).sum((1, 2))  # bit 4 n + j
            s6 = sc + 32
            low = (s6[:, :8] & 0xF) | ((s6[:, 8:] & 0xF) << 4)
            high = (((s6 >> 4) & 3).view(N, 4, 4) << (2 * torch.arange(4, device=q.device).view(1, 4, 1))).sum(1)
            parts = [u8(hm), u8(qs), u8(low), u8(high), d]
    out = torch.cat(parts, 1)
    assert out.shape[1] == kt.block_bytes
    return out.reshape(rows, n_sb * kt.block_bytes)


def unpack_blocks(blocks: torch.Tensor, rows: int, cols: int, kt: KType) -> tuple[torch.Tensor, KParams]:
    """(codes [rows, cols] uint8, grid) of GGUF blocks (uint8, any shape holding rows x cols / 256 blocks)."""
    if cols % QK:
        raise ValueError(f"k-quants need rows of whole {QK}-weight super-blocks, got {cols} columns")
    N = rows * (cols // QK)
    if blocks.numel() != N * kt.block_bytes:
        raise ValueError(f"{kt.name} blocks have {blocks.numel()} bytes, a {rows}x{cols} layer needs {N * kt.block_bytes}")
    b = blocks.reshape(N, kt.block_bytes).to(torch.int32)
    dev = blocks.device
    f16 = lambda t: t.to(torch.uint8).contiguous().view(torch.float16).reshape(N).to(torch.float32)
    dmin = m = None
    if kt.name in ("Q4_K", "Q5_K"):
        d, dmin, s = f16(b[:, 0:2]), f16(b[:, 2:4]), b[:, 4:16]
        sc = torch.cat([s[:, :4] & 63, (s[:, 8:] & 0xF) | ((s[:, :4] >> 6) << 4)], 1)
        m = torch.cat([s[:, 4:8] & 63, (s[:, 8:] >> 4) | ((s[:, 4:8] >> 6) << 4)], 1)
        qs = b[:, -128:].view(N, 4, 1, 32)
        q = (qs >> (4 * torch.arange(2, device=dev).view(1, 1, 2, 1))) & 0xF  # [N, 4, 2, 32]
        if kt.name == "Q5_K":
            qh = b[:, 16:48].view(N, 1, 1, 32)
            shift = 2 * torch.arange(4, device=dev).view(1, 4, 1, 1) + torch.arange(2, device=dev).view(1, 1, 2, 1)
            q = q | (((qh >> shift) & 1) << 4)
    elif kt.name == "Q6_K":
        ql, qh, sc, d = b[:, :128].view(N, 2, 2, 32), b[:, 128:192].view(N, 2, 1, 32), b[:, 192:208], f16(b[:, 208:210])
        sc = sc.to(torch.uint8).view(torch.int8).to(torch.int32)
        low = torch.stack([ql[:, :, 0] & 0xF, ql[:, :, 1] & 0xF, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], 2)  # [N, 2, 4, 32]
        q = low | (((qh >> (2 * torch.arange(4, device=dev).view(1, 1, 4, 1))) & 3) << 4)
    else:
        if kt.name == "Q2_K":
            s, qs, d, dmin = b[:, :16], b[:, 16:80], f16(b[:, 80:82]), f16(b[:, 82:84])
            sc, m = s & 0xF, s >> 4
            hbits = 0
        else:
            hm, qs, s, d = b[:, :32], b[:, 32:96], b[:, 96:108], f16(b[:, 108:110])
            low = torch.cat([s[:, :8] & 0xF, s[:, :8] >> 4], 1)
            high = ((s[:, 8:].view(N, 1, 4) >> (2 * torch.arange(4, device=dev).view(1, 4, 1))) & 3).reshape(N, 16)
            sc = (low | (high << 4)) - 32
            hbits = ((hm.view(N, 1, 1, 32) >> torch.arange(8, device=dev).view(1, 2, 4, 1)) & 1) << 2
        q = ((qs.view(N, 2, 1, 32) >> (2 * torch.arange(4, device=dev).view(1, 1, 4, 1))) & 3) | hbits
    p = KParams(d.view(rows, -1), None if dmin is None else dmin.view(rows, -1), sc.to(torch.float32).reshape(rows, -1),
                None if m is None else m.to(torch.float32).reshape(rows, -1))
    return q.reshape(rows, cols).to(torch.uint8), p


@dataclass
class KQuantWeight:
    """Codes [out, in] (uint8) on a k-quant grid (layouts.KQuant): what GPTQ / RTN with `--grid gguf:TYPE` give."""

    layout = "kquant"

    codes: torch.Tensor
    params: KParams
    type: str

    @property
    def kt(self) -> KType:
        return TYPES[self.type]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def bits(self) -> int:
        return self.kt.bits

    @property
    def group_size(self) -> int:
        return self.kt.sub

    @property
    def symmetric(self) -> bool:
        return not self.kt.has_min

    def spec(self) -> dict:
        return {"layout": "kquant", "gguf_type": self.type}

    def _grid(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.params.step_offset(self.kt)
        expand = lambda t: t.to(device).repeat_interleave(self.kt.sub, dim=1)
        return expand(a), expand(b)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        a, b = self._grid(self.codes.device)
        return values(self.codes.to(torch.float32), a, b, self.kt).to(dtype)

    def round_to_grid(self, W: torch.Tensor) -> torch.Tensor:
        """W rounded to nearest on this weight's grid, dequantized (the 'before' of GPTQ's compensation)."""
        a, b = self._grid(W.device)
        return values(codes_for(W.to(torch.float32), a, b, self.kt), a, b, self.kt)

    def rows(self, start: int, stop: int) -> "KQuantWeight":
        p = self.params
        cut = lambda t: None if t is None else t[start:stop]
        return KQuantWeight(self.codes[start:stop], KParams(cut(p.d), cut(p.dmin), cut(p.sc), cut(p.m)), self.type)

    def blocks(self) -> torch.Tensor:
        """The GGUF blocks [out, in / 256 * block_bytes] (uint8)."""
        return pack_blocks(self.codes, self.params, self.kt)

    def packed_state(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.blocks().reshape(-1).cpu()}

    @classmethod
    def from_packed(cls, state: dict[str, torch.Tensor], shape: tuple[int, int], type: str) -> "KQuantWeight":
        codes, p = unpack_blocks(state["qweight"], *shape, ktype(type))
        return cls(codes, p, ktype(type).name)


def quantize_rtn(W: torch.Tensor, type: str, col_weight: torch.Tensor | None = None, clip_search: int = 20,
                 max_shrink: float = 0.3) -> KQuantWeight:
    """W [out, in] rounded to nearest on its fitted k-quant grid."""
    kt = ktype(type)
    W = W.to(torch.float32)
    p = fit(W, kt, col_weight, clip_search, max_shrink)
    a, b = p.step_offset(kt)
    q = codes_for(W, a.repeat_interleave(kt.sub, 1), b.repeat_interleave(kt.sub, 1), kt)
    return KQuantWeight(q.to(torch.uint8), p, kt.name)


def grid_type(grid: str) -> str | None:
    """The k-quant type of a `--grid` value (gguf:Q4_K -> Q4_K), None for the affine grid."""
    return None if grid == "affine" else grid.split(":", 1)[1]


def fallback_config(cfg):
    """The affine config of a layer whose rows are not whole super-blocks under `--grid gguf:TYPE`: llama.cpp's
    block-32 fallback type (FALLBACK) as an rdquant grid, which the GGUF export writes exactly."""
    bits, symmetric, scale_bits = FALLBACK[grid_type(cfg.grid)]
    return cfg.replace(grid="affine", bits=bits, group_size=32, symmetric=symmetric, scale_bits=scale_bits)
