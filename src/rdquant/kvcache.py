"""Quantized KV cache (WKVQuant): past keys and values stored packed at 2/3/4/8 bits with an fp16 scale
and minimum per group: values token-wise along head_dim, keys per channel over groups of tokens (or
token-wise, WKVQuant's layout, optionally after its two-dimensional quantization).

Past-only: a token attends to its own K/V (and, as an option, to the `residual` most recent tokens) in
full precision and to the dequantized past; a prefill chunk attends to itself in full precision and is
quantized as it is written. Two-dimensional quantization centres and scales channels statically before
the token-wise groups: the key shift (post-RoPE, so it can't live in a bias) is subtracted from every key
the cache hands out, the current token's included, and cancels in softmax; the value shift is folded
into v_proj's bias and back out through o_proj's (rows of softmax sum to one), and the key scales into
q_proj / k_proj (`calibrate`): the float model's function is unchanged under any attention.

Two ways to run the same arithmetic:
- `QuantizedKVCache`, a transformers Cache for `generate(..., past_key_values=...)` and rdquant's own
  generate (token by token);
- `past_only(model)`, a context in which a plain forward (no cache) computes every position as the cache
  would have, in one pass: scores and outputs against the quantized K/V, with full precision where the
  cache keeps it (`fp_window`). Evaluation uses it; a test checks the two agree.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import packing
from .errors import RdquantError

KV_BITS = (2, 3, 4, 8)
ATTN_NAME = "rdquant_past_only"
DECODE_ATTN = "rdquant_kv_decode"  # sdpa, except a decode step of QuantizedKVCache reads the packed past (Triton)
CRR_ATTN = "rdquant_kv_crr"  # training: learnable K/V transforms and straight-through fake quantization


KEY_AXES = ("channel", "token")
CLIPS = (1.0, 0.9, 0.8, 0.7)  # range fractions the clip search tries per group


@dataclass(frozen=True)
class KVSpec:
    """How the cache stores K and V. Values: token-wise groups of `group_size` along head_dim (-1: the whole
    head). Keys: per channel over groups of `key_tokens` tokens (`key_axis` channel: the past's slowly
    varying channels cost few levels; the newest partial group waits in 16 bits) or token-wise like the
    values (`token`). `residual`: most recent past tokens kept in 16 bits besides. `clip`: each group's
    range shrunk to the fraction of CLIPS with the least squared error, instead of min-max."""

    bits: int = 4
    group_size: int = -1
    residual: int = 0
    key_axis: str = "channel"
    key_tokens: int = 32
    clip: bool = False

    def check(self, head_dim: int) -> None:
        """A one-line error for a spec this model's heads can't take."""
        if self.bits not in KV_BITS:
            raise RdquantError(f"--kv-bits {self.bits} is not supported: use one of {', '.join(map(str, KV_BITS))}")
        g = self.group(head_dim)
        if g < 1 or head_dim % g:
            raise RdquantError(f"--kv-group {self.group_size} does not divide the head size {head_dim}: use a divisor "
                               "of it, or -1 for one group per head")
        if (head_dim * self.bits) % 8:
            raise RdquantError(f"a head of {head_dim} values at {self.bits} bits is not a whole number of bytes")
        if self.residual < 0:
            raise RdquantError(f"--kv-residual must be 0 or more (got {self.residual})")
        if self.key_axis not in KEY_AXES:
            raise RdquantError(f"--kv-key-axis {self.key_axis!r}: use channel or token")
        if self.key_tokens < 1:
            raise RdquantError(f"--kv-key-tokens must be at least 1 (got {self.key_tokens})")

    def group(self, head_dim: int) -> int:
        return head_dim if self.group_size == -1 else self.group_size

    @property
    def unit(self) -> int:
        """Tokens that leave the 16-bit window together (a key group, or one token)."""
        return self.key_tokens if self.key_axis == "channel" else 1

    def bytes_per_token(self, head_dim: int, kv_heads: int) -> float:
        """Cache bytes per token per layer for K and V at long context: packed codes plus an fp16 scale and
        minimum per group."""
        v_grid = 4 * head_dim // self.group(head_dim)
        k_grid = 4 * head_dim / self.key_tokens if self.key_axis == "channel" else v_grid
        return kv_heads * (2 * head_dim * self.bits / 8 + v_grid + k_grid)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- group quantization ----------------------------------------------------------------------------

def quantize_groups(xg: torch.Tensor, bits: int, dim: int, clip: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric quantization of xg with one fp16 (scale, minimum) per slice along `dim`: codes uint8 of
    xg's shape, scale and minimum with `dim` dropped. Codes are rounded against the stored fp16 grid, so
    the round trip is within half a step inside the (possibly clipped) range."""
    x = xg.float()
    lo0, hi0 = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    qmax = (1 << bits) - 1
    best = None
    for c in CLIPS if clip else (1.0,):
        mid, half = (hi0 + lo0) / 2, (hi0 - lo0) / 2 * c
        lo = (mid - half).half()
        scale = (2 * half / qmax).clamp_min(1e-8).half()
        codes = ((x - lo.float()) / scale.float()).round_().clamp_(0, qmax)
        if not clip:
            best = (codes, scale, lo)
            break
        err = ((codes * scale.float() + lo.float() - x) ** 2).sum(dim, keepdim=True)
        if best is None:
            best = (codes, scale, lo, err)
        else:
            better = err < best[3]
            best = (torch.where(better, codes, best[0]), torch.where(better, scale, best[1]),
                    torch.where(better, lo, best[2]), torch.minimum(err, best[3]))
    codes, scale, lo = best[:3]
    return codes.to(torch.uint8), scale.squeeze(dim), lo.squeeze(dim)


def quantize_tokens(x: torch.Tensor, bits: int, group: int, clip: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., D] -> codes uint8 [..., D], scale and minimum fp16 [..., D / group]: one grid per group of
    `group` consecutive values of a token."""
    *lead, D = x.shape
    codes, scale, lo = quantize_groups(x.reshape(*lead, D // group, group), bits, -1, clip)
    return codes.reshape(*lead, D), scale, lo


def dequantize_tokens(codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    *lead, D = codes.shape
    group = D // scale.shape[-1]
    x = codes.reshape(*lead, D // group, group).float() * scale.float()[..., None] + lo.float()[..., None]
    return x.reshape(*lead, D).to(dtype)


def quantize_channels(x: torch.Tensor, bits: int, tokens: int, clip: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [B, H, n, D] (n a multiple of `tokens`) -> codes [B, H, n, D], scale and minimum [B, H, n / tokens,
    D]: one grid per channel per group of `tokens` consecutive tokens."""
    B, H, n, D = x.shape
    codes, scale, lo = quantize_groups(x.reshape(B, H, n // tokens, tokens, D), bits, 3, clip)
    return codes.reshape(B, H, n, D), scale, lo


def dequantize_channels(codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    B, H, n, D = codes.shape
    g = scale.shape[2]
    x = codes.reshape(B, H, g, n // g, D).float() * scale.float()[:, :, :, None] + lo.float()[:, :, :, None]
    return x.reshape(B, H, n, D).to(dtype)


def fake_quant_tokens(x: torch.Tensor, bits: int, group: int, clip: bool = False) -> torch.Tensor:
    """x through quantize_tokens and back, in x's dtype (what the cache hands out for a past token)."""
    return dequantize_tokens(*quantize_tokens(x, bits, group, clip), dtype=x.dtype)


def fake_quant_ste(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Min-max fake quantization of x with one grid per slice along `dim`, differentiable for training:
    rounding is straight-through, and the range (so the step, so the error's size) carries the gradient."""
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    step = ((hi - lo) / ((1 << bits) - 1)).clamp_min(1e-8)
    y = (x - lo) / step
    return (y + (y.round() - y).detach()) * step + lo


# --- per-layer parameters -------------------------------------------------------------------------

SHIFT = "kv_shift_k"  # the buffer on each attention module that holds its key shift (saved with the block)


class KVParams:
    """One attention layer's KV quantization: the spec, and the module's static per-channel key shift
    [kv_heads, head_dim] (a buffer of the module, so checkpoints and artifacts carry it) subtracted from keys
    (post-RoPE, as cached) before token-wise quantization."""

    def __init__(self, spec: KVSpec, attn: nn.Module) -> None:
        self.spec, self.attn = spec, attn
        self.pending: tuple[Any, int] | None = None  # (the cache layer, packed tokens) for the fused attention

    @property
    def shift_k(self) -> torch.Tensor:
        return getattr(self.attn, SHIFT)

    def shifted(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k [B, kv_heads, T, D] minus the key shift, and v (what the cache stores and hands out)."""
        return k - self.shift_k[None, :, None, :].to(k.device, k.dtype), v

    def fake_values(self, v: torch.Tensor, ste: bool = False) -> torch.Tensor:
        """Values [B, H, S, D] as the cache hands them out once quantized (`ste`: min-max, differentiable)."""
        g = self.spec.group(v.shape[-1])
        if ste:
            *lead, D = v.shape
            return fake_quant_ste(v.reshape(*lead, D // g, g), self.spec.bits, -1).reshape(v.shape)
        return fake_quant_tokens(v, self.spec.bits, g, self.spec.clip)

    def fake_keys(self, k: torch.Tensor, ste: bool = False) -> torch.Tensor:
        """Shifted keys [B, H, S, D] as the cache hands them out once quantized (channel axis: the complete
        groups of key_tokens from the first token; the rest is never seen quantized, and stays). `ste`:
        min-max, differentiable (fake_quant_ste)."""
        sp = self.spec
        if sp.key_axis == "token":
            return self.fake_values(k, ste) if ste else fake_quant_tokens(k, sp.bits, sp.group(k.shape[-1]), sp.clip)
        B, H, S, D = k.shape
        n = S // sp.key_tokens * sp.key_tokens
        if not n:
            return k
        if ste:
            q = fake_quant_ste(k[:, :, :n].reshape(B, H, n // sp.key_tokens, sp.key_tokens, D), sp.bits, 3)
            return torch.cat([q.reshape(B, H, n, D), k[:, :, n:]], 2)
        out = k.clone()
        out[:, :, :n] = dequantize_channels(*quantize_channels(k[:, :, :n], sp.bits, sp.key_tokens, sp.clip), dtype=k.dtype)
        return out


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules under `model` (a model or one block) in layer order: those with k_proj,
    v_proj, o_proj and a layer_idx."""
    mods = [m for m in model.modules() if all(hasattr(m, a) for a in ("k_proj", "v_proj", "o_proj", "layer_idx"))]
    return sorted(mods, key=lambda m: m.layer_idx)


def head_shape(attn: nn.Module) -> tuple[int, int]:
    """(kv heads, head_dim) of a transformers attention module."""
    cfg = getattr(attn, "config", None)
    D = getattr(attn, "head_dim", None)
    if cfg is None or D is None or not hasattr(cfg, "num_attention_heads"):
        raise RdquantError("KV quantization needs transformers attention modules (with a config and head_dim)")
    return getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads, D


def attach(model: nn.Module, spec: KVSpec) -> list[KVParams]:
    """Give every attention module under `model` a `kv_quant` KVParams and a zero key-shift buffer where it
    has none (an artifact's shifts are then read into it). Returns them in layer order."""
    mods = attention_modules(model)
    if not mods:
        raise RdquantError("KV quantization found no attention modules (k_proj / v_proj / o_proj) in this model")
    out = []
    for m in mods:
        kv, D = head_shape(m)
        spec.check(D)
        if getattr(m, SHIFT, None) is None:
            t = next((t for t in (*m.parameters(), *m.buffers()) if t.device.type != "meta"), None)
            m.register_buffer(SHIFT, torch.zeros(kv, D, dtype=torch.float32, device=t.device if t is not None else "cpu"))
        m.kv_quant = KVParams(spec, m)
        out.append(m.kv_quant)
    return out


def kv_params(model: nn.Module) -> list[KVParams]:
    return [m.kv_quant for m in attention_modules(model) if getattr(m, "kv_quant", None) is not None]


# --- the cache -----------------------------------------------------------------------------------

class _Growing:
    """One tensor [B, H, n, ...] that grows along dim 2 (its capacity doubles as it fills)."""

    def __init__(self) -> None:
        self.t: torch.Tensor | None = None
        self.n = 0

    def append(self, x: torch.Tensor) -> None:
        m = x.shape[2]
        if self.t is None or self.n + m > self.t.shape[2]:
            cap = max(2 * (self.n + m), 64)
            new = x.new_zeros(*x.shape[:2], cap, *x.shape[3:])
            if self.t is not None:
                new[:, :, : self.n] = self.t[:, :, : self.n]
            self.t = new
        self.t[:, :, self.n : self.n + m] = x
        self.n += m

    def view(self) -> torch.Tensor:
        return self.t[:, :, : self.n]  # type: ignore[index]

    def nbytes(self) -> int:
        return 0 if self.t is None else self.view().numel() * self.t.element_size()


class _Packed:
    """A tensor's quantized past: packed code rows (one per token) and the grids (one row per token, or
    per group of tokens for keys quantized per channel)."""

    def __init__(self) -> None:
        self.codes, self.scale, self.lo = _Growing(), _Growing(), _Growing()

    @property
    def n(self) -> int:
        return self.codes.n

    def append(self, codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor) -> None:
        self.codes.append(codes)
        self.scale.append(scale)
        self.lo.append(lo)

    def nbytes(self) -> int:
        return self.codes.nbytes() + self.scale.nbytes() + self.lo.nbytes()


def _pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [..., D] -> [..., D * bits / 8] bytes (each row packs to whole bytes)."""
    *lead, D = codes.shape
    return packing.pack(codes, bits).view(*lead, D * bits // 8)


def _unpack_rows(packed: torch.Tensor, bits: int, D: int) -> torch.Tensor:
    *lead, _ = packed.shape
    return packing.unpack(packed.reshape(-1), bits, packed.numel() * 8 // bits).view(*lead, D)


def _dynamic_layer():
    from transformers.cache_utils import DynamicLayer

    return DynamicLayer


class QuantizedKVLayer(_dynamic_layer()):  # type: ignore[misc]
    """One layer of QuantizedKVCache: tokens older than the residual window are stored packed; the window
    (the `residual` most recent past tokens) stays in the model's dtype."""

    is_croppable = False

    def __init__(self, params: KVParams, fused: bool = False) -> None:
        super().__init__()
        self.params, self.fused = params, fused
        self.k, self.v = _Packed(), _Packed()
        self.rk: torch.Tensor | None = None  # the full-precision window [B, H, <= residual, D]
        self.rv: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.fused = self.fused and decode_kernel_runs(self.device, self.dtype, key_states.shape[-1], self.params.spec)
        self.keys = key_states[:, :, :0]  # empty: transformers' helpers read device and dtype off these
        self.values = value_states[:, :, :0]
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.k.n + (0 if self.rk is None else self.rk.shape[2])

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        raise RdquantError("a quantized KV cache can't be cropped (its tokens are packed as they arrive)")

    def reset(self) -> None:
        self.k, self.v = _Packed(), _Packed()
        self.rk = self.rv = None
        super().reset()

    def _store(self, k: torch.Tensor, v: torch.Tensor) -> None:
        sp, D = self.params.spec, k.shape[-1]
        if sp.key_axis == "channel":
            kc, ks, kl = quantize_channels(k, sp.bits, sp.key_tokens, sp.clip)
        else:
            kc, ks, kl = quantize_tokens(k, sp.bits, sp.group(D), sp.clip)
        self.k.append(_pack_rows(kc, sp.bits), ks, kl)
        vc, vs, vl = quantize_tokens(v, sp.bits, sp.group(D), sp.clip)
        self.v.append(_pack_rows(vc, sp.bits), vs, vl)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys/values to attend over: the dequantized past, the window, then this chunk in full
        precision (all shifted); then the chunk joins the window and what leaves it is quantized. A decode
        step under the fused attention (`use_decode_kernel`) returns only the exact part (window and chunk)
        and leaves the packed past to the attention function (`pending`)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        k, v = self.params.shifted(key_states, value_states)
        sp = self.params.spec
        wk = k if self.rk is None else torch.cat([self.rk, k], 2)
        wv = v if self.rv is None else torch.cat([self.rv, v], 2)
        if self._fused_step(k):
            self.params.pending = (self, self.k.n)
            keys, values = wk, wv
        elif self.k.n:
            pk, pv = self.dequantized_past(self.k.n, k)
            keys, values = torch.cat([pk, wk], 2), torch.cat([pv, wv], 2)
        else:
            keys, values = wk, wv
        out = max(wk.shape[2] - sp.residual, 0) // sp.unit * sp.unit  # whole key groups past the residual
        if out > 0:
            self._store(wk[:, :, :out], wv[:, :, :out])
            wk, wv = wk[:, :, out:], wv[:, :, out:]
        self.rk, self.rv = (wk, wv) if wk.shape[2] else (None, None)
        return keys, values

    def _fused_step(self, k: torch.Tensor) -> bool:
        """Whether this step's attention reads the packed past in the kernel: a fused cache whose K/V the
        kernel takes (decided at the first update), one new token, a packed past, and the model's attention
        set to DECODE_ATTN."""
        attn = self.params.attn
        return (self.fused and k.shape[2] == 1 and self.k.n > 0
                and getattr(getattr(attn, "config", None), "_attn_implementation", None) == DECODE_ATTN)

    def _grid_rows(self, n: int) -> int:
        """Key grid rows of the first n packed tokens (one per key group on the channel axis, else per token)."""
        return n // self.params.spec.key_tokens if self.params.spec.key_axis == "channel" else n

    def fused_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int, scaling: float) -> torch.Tensor:
        """Attention [B, Hq, D] of one query token q [B, Hq, D] over the first n packed past tokens (read by
        the Triton kernel) and the exact keys/values k, v [B, Hkv, E, D]."""
        from .kernels import kv_triton

        sp, rows = self.params.spec, self._grid_rows(n)
        o, m, l = kv_triton.packed_attention(
            q, self.k.codes.t[:, :, :n], self.k.scale.t[:, :, :rows], self.k.lo.t[:, :, :rows],
            self.v.codes.t[:, :, :n], self.v.scale.t[:, :, :n], self.v.lo.t[:, :, :n], sp.bits,
            sp.key_tokens if sp.key_axis == "channel" else 0, scaling)
        return kv_triton.merge(o, m, l, q, k, v, scaling)

    def dequantized_past(self, n: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first n packed past tokens' keys and values, dequantized to like's dtype."""
        sp, D, rows = self.params.spec, like.shape[-1], self._grid_rows(n)
        deq = dequantize_channels if sp.key_axis == "channel" else dequantize_tokens
        kc = _unpack_rows(self.k.codes.t[:, :, :n].contiguous(), sp.bits, D)
        vc = _unpack_rows(self.v.codes.t[:, :, :n].contiguous(), sp.bits, D)
        return (deq(kc, self.k.scale.t[:, :, :rows], self.k.lo.t[:, :, :rows], like.dtype),
                dequantize_tokens(vc, self.v.scale.t[:, :, :n], self.v.lo.t[:, :, :n], like.dtype))

    def nbytes(self) -> int:
        fp = sum(t.numel() * t.element_size() for t in (self.rk, self.rv) if t is not None)
        return self.k.nbytes() + self.v.nbytes() + fp


def _cache_base():
    from transformers.cache_utils import Cache

    return Cache


class QuantizedKVCache(_cache_base()):  # type: ignore[misc]
    """A transformers Cache whose layers store K/V quantized (past-only). Build it from a model that has
    KV parameters attached (`attach`, or an artifact compressed with --kv-bits):
    `model.generate(..., past_key_values=QuantizedKVCache(model))`. `fused` (None: where it runs, i.e. a
    16-bit model on CUDA with triton installed): decode steps attend over the packed past in a Triton kernel
    (`use_decode_kernel` switches the model's attention to DECODE_ATTN for that)."""

    def __init__(self, model: nn.Module, fused: bool | None = None) -> None:
        params = kv_params(model)
        if not params:
            raise RdquantError("this model has no KV quantization attached: compress with --kv-bits, or call "
                               "rdquant.kvcache.attach(model, KVSpec(...)) first")
        fused = (fused or fused is None) and use_decode_kernel(model, required=bool(fused))
        super().__init__(layers=[QuantizedKVLayer(p, fused) for p in params])

    def nbytes(self) -> int:
        """Bytes the cache holds now (packed codes, scales, minimums and the full-precision window)."""
        return sum(lay.nbytes() for lay in self.layers)


# --- one-pass past-only attention ----------------------------------------------------------------

def fp_window(T: int, S: int, residual: int, device: torch.device, unit: int = 1) -> torch.Tensor:
    """[T, S] True where query i (the last T of S positions) sees key j in full precision, as the cache
    computes token by token: the cache has quantized the tokens before unit * floor((i - residual) / unit)
    (whole groups of `unit` that left the residual window), the rest (i itself included) is exact."""
    i = torch.arange(S - T, S, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    return j >= (i - residual).clamp_min(0) // unit * unit


def mixed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kq: torch.Tensor, vq: torch.Tensor,
                    full: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [B, H, T, D] over keys/values that are exact (k, v) where `full` [T, S] is True and
    quantized (kq, vq) elsewhere; k, v, kq, vq already repeated to H heads. Returns ([B, T, H, D], probs)."""
    s = torch.where(full, q @ k.transpose(-1, -2), q @ kq.transpose(-1, -2)) * scaling
    if mask is not None:
        s = s + mask[..., : k.shape[-2]]
    p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    o = torch.where(full, p, 0) @ v + torch.where(full, 0, p) @ vq
    return o.transpose(1, 2).contiguous(), p


def _repeat(x: torch.Tensor, n: int) -> torch.Tensor:
    return x if n == 1 else x.repeat_interleave(n, dim=1)


def _past_only_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, **kwargs: Any):
    """transformers attention function: the cache's past-only arithmetic for a whole window at once."""
    params: KVParams | None = getattr(module, "kv_quant", None)
    quantizer: Callable | None = getattr(module, "kv_fake", None)  # a peer's scheme (bench/kv.py)
    if params is None and quantizer is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    n = query.shape[1] // key.shape[1]
    if quantizer is not None:
        k, v = key, value
        kq, vq, full = quantizer(k, v, query.shape[-2])
    else:
        k, v = params.shifted(key, value)
        kq, vq = params.fake_keys(k), params.fake_values(v)
        full = fp_window(query.shape[-2], key.shape[-2], params.spec.residual, query.device, params.spec.unit)
    return mixed_attention(query, _repeat(k, n), _repeat(v, n), _repeat(kq, n), _repeat(vq, n), full,
                           attention_mask, scaling)


def decode_kernel_runs(device: torch.device, dtype: torch.dtype, head_dim: int, spec: KVSpec) -> bool:
    """Whether the packed-cache decode kernel runs for K/V of this device, dtype and head size under this
    spec: 16-bit, a head size it takes, on CUDA (or on the CPU under Triton's interpreter, for tests)."""
    from .backends import kernel_runs_on

    if not kernel_runs_on("triton", device):
        return False
    from .kernels.kv_triton import supported

    return supported(head_dim, spec.bits, dtype)


def use_decode_kernel(model: nn.Module, required: bool = False) -> bool:
    """Switch the model's attention to DECODE_ATTN (sdpa, with QuantizedKVCache's decode steps over the packed
    past in the kernel) when the kernel runs for it; `required`: a one-line error where it does not."""
    params = kv_params(model)
    p = next(model.parameters())
    if not params or not decode_kernel_runs(p.device, p.dtype, head_shape(params[0].attn)[1], params[0].spec):
        if required:
            raise RdquantError("the fused KV decode kernel needs a 16-bit model on CUDA with triton installed and a "
                               "power-of-two head size: pass fused=False (or None) to QuantizedKVCache")
        return False
    _register()
    for c in _configs(model):
        c._attn_implementation = DECODE_ATTN
    return True


def _decode_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, **kwargs: Any):
    """transformers attention function: sdpa, except where the cache left a decode step's packed past
    (`KVParams.pending`): then key/value are only the exact part, and the kernel reads the past."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    params: KVParams | None = getattr(module, "kv_quant", None)
    pending = None if params is None else params.pending
    if pending is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    params.pending = None
    layer, n = pending
    if attention_mask is None and query.shape[2] == 1:
        out = layer.fused_attention(query[:, :, 0], key, value, n, scaling)  # [B, Hq, D]
        return out[:, None], None
    pk, pv = layer.dequantized_past(n, key)  # a mask (padding): the dequantized past through sdpa
    return sdpa_attention_forward(module, query, torch.cat([pk, key], 2), torch.cat([pv, value], 2), attention_mask,
                                  scaling=scaling, dropout=dropout, **kwargs)


def _configs(model: nn.Module) -> list[Any]:
    """The model's config and its text config (multimodal wrappers), once each."""
    return [c for c in {id(c): c for c in (model.config, getattr(model.config, "text_config", None)) if c}.values()]


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, _past_only_attention)
    AttentionInterface.register(DECODE_ATTN, _decode_attention)
    AttentionInterface.register(CRR_ATTN, _crr_attention)
    try:  # the masks these functions take: eager (additive float) and sdpa's
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask

        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, eager_mask)
        ALL_MASK_ATTENTION_FUNCTIONS.register(CRR_ATTN, eager_mask)
        ALL_MASK_ATTENTION_FUNCTIONS.register(DECODE_ATTN, sdpa_mask)
    except ImportError:  # pragma: no cover - older transformers
        pass


@contextlib.contextmanager
def past_only(model: nn.Module) -> Iterator[None]:
    """Within: a forward without a cache computes each position as the quantized cache would (one pass)."""
    with _using(_configs(model), ATTN_NAME):
        yield


@contextlib.contextmanager
def _using(configs: list[Any], name: str) -> Iterator[None]:
    """Within: these configs' attention implementation is `name` (registered); restored after."""
    _register()
    before = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation = name
        yield
    finally:
        for c, b in zip(configs, before):
            c._attn_implementation = b


def has_kv(model: nn.Module) -> bool:
    return any(getattr(m, "kv_quant", None) is not None or getattr(m, "kv_fake", None) is not None
               for m in attention_modules(model))


# --- calibration and folds (two-dimensional quantization) ----------------------------------------

def _rep_heads(x: torch.Tensor, n: int) -> torch.Tensor:
    """[kv_heads, D] -> [kv_heads * n * D]: each query head's copy of its KV head's row, flattened."""
    return x.repeat_interleave(n, dim=0).reshape(-1)


def _add_bias(lin: nn.Module, add: torch.Tensor) -> None:
    if lin.bias is None:
        lin.bias = nn.Parameter(add.to(lin.weight.dtype).to(lin.weight.device))
    else:
        lin.bias.data += add.to(lin.bias.dtype).to(lin.bias.device)


@torch.no_grad()
def fold_value_shift(attn: nn.Module, shift_v: torch.Tensor) -> None:
    """Centre the values by shift_v [kv_heads, D]: subtract it in v_proj's bias and add o_proj(shift_v) to
    o_proj's bias (each softmax row sums to one, so the attention output is exactly shift_v short)."""
    n = attn.o_proj.in_features // shift_v.numel()
    _add_bias(attn.v_proj, -shift_v.reshape(-1).float())
    _add_bias(attn.o_proj, attn.o_proj.weight.float() @ _rep_heads(shift_v.float(), n).to(attn.o_proj.weight.device))


Runner = Callable[[dict[str, Any]], None]  # runs the calibration forwards with these extra keyword arguments


@torch.no_grad()
def smooth_keys(mods: list[nn.Module], run: Runner, alpha: float = 0.5) -> int:
    """Per-channel key scales folded into k_proj (divide) and q_proj (multiply): scores are unchanged and the
    cached keys' channels come closer in range, so token-wise groups lose less to outlier channels. A
    scale is shared by each rotary pair (channels c and c + D/2 rotate together, so RoPE commutes with
    it); it is max|k|^alpha / max|q|^(1 - alpha) of the pair's norm over the tokens (the root mean square
    did worse: docs/notes/2026-12-05-kv.md). Skipped for attention with a norm on q/k (its output does
    not scale with the projection). Returns the layers smoothed."""
    mods = [m for m in mods if not (hasattr(m, "q_norm") or hasattr(m, "k_norm"))]
    if not mods:
        return 0
    peaks: dict[tuple[int, str], torch.Tensor] = {}  # the largest squared pair norms [heads, D/2]

    def hook(idx: int, name: str, D: int):
        def f(_mod, _inp, out):
            x = out.detach().float().reshape(-1, out.shape[-1] // D, D)
            pair = (x[..., : D // 2] ** 2 + x[..., D // 2 :] ** 2).amax(0)
            key = (idx, name)
            peaks[key] = pair if key not in peaks else torch.maximum(peaks[key], pair)
        return f

    handles = []
    for m in mods:
        D = head_shape(m)[1]
        handles += [m.q_proj.register_forward_hook(hook(m.layer_idx, "q", D)),
                    m.k_proj.register_forward_hook(hook(m.layer_idx, "k", D))]
    try:
        run({})
    finally:
        for h in handles:
            h.remove()
    for m in mods:
        kv, D = head_shape(m)
        norm = {n: peaks[(m.layer_idx, n)].sqrt() for n in ("q", "k")}
        pk = norm["k"].clamp_min(1e-5)  # [kv, D/2]
        n = norm["q"].shape[0] // kv
        pq = norm["q"].reshape(kv, n, D // 2).amax(1).clamp_min(1e-5)
        fold_key_scale(m, pk ** alpha / pq ** (1 - alpha))
    return len(mods)


@torch.no_grad()
def fold_key_scale(attn: nn.Module, s: torch.Tensor) -> None:
    """Divide the keys by s [kv_heads, D/2] (one scale per rotary pair: channels c and c + D/2, so RoPE
    commutes with it) in k_proj and multiply the queries by it in q_proj: scores are unchanged."""
    s = torch.cat([s, s], -1)  # [kv, D]
    n = attn.q_proj.out_features // s.numel()
    for proj, scale in ((attn.k_proj, 1 / s.reshape(-1)), (attn.q_proj, _rep_heads(s, n))):
        proj.weight.data *= scale.to(proj.weight.device, proj.weight.dtype)[:, None]
        if proj.bias is not None:
            proj.bias.data *= scale.to(proj.bias.device, proj.bias.dtype)


@torch.no_grad()
def fold_value_scale(attn: nn.Module, s: torch.Tensor) -> None:
    """Divide the values by s [kv_heads, D] in v_proj's rows and multiply o_proj's matching input columns
    by it (each query head's copy of its KV head): the attention output is unchanged."""
    n = attn.o_proj.in_features // s.numel()
    v = 1 / s.reshape(-1)
    attn.v_proj.weight.data *= v.to(attn.v_proj.weight.device, attn.v_proj.weight.dtype)[:, None]
    if attn.v_proj.bias is not None:
        attn.v_proj.bias.data *= v.to(attn.v_proj.bias.device, attn.v_proj.bias.dtype)
    attn.o_proj.weight.data *= _rep_heads(s, n).to(attn.o_proj.weight.device, attn.o_proj.weight.dtype)[None, :]


class _Recorder(_cache_base()):  # type: ignore[misc]
    """A cache that keeps nothing and records each layer's per-channel min and max of K and V."""

    def __init__(self) -> None:
        super().__init__(layer_class_to_replicate=_dynamic_layer())
        self.lo: dict[tuple[int, str], torch.Tensor] = {}
        self.hi: dict[tuple[int, str], torch.Tensor] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        for name, x in (("k", key_states), ("v", value_states)):
            x = x.detach().float().transpose(1, 2).reshape(-1, x.shape[1], x.shape[-1])  # [tokens, kv, D]
            lo, hi = x.amin(0), x.amax(0)
            key = (layer_idx, name)
            self.lo[key] = lo if key not in self.lo else torch.minimum(self.lo[key], lo)
            self.hi[key] = hi if key not in self.hi else torch.maximum(self.hi[key], hi)
        return key_states, value_states

    def midrange(self, key: tuple[int, str]) -> torch.Tensor:
        """Per-channel (max + min) / 2 (the mean did worse: docs/notes/2026-12-05-kv.md)."""
        return (self.lo[key] + self.hi[key]) / 2

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


def cache_kwarg(module: nn.Module) -> str:
    """The keyword a transformers model or block takes its cache by ('cache' since 5.x, else past_key_values)."""
    import inspect

    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


@torch.no_grad()
def calibrate_modules(mods: list[nn.Module], run: Runner, spec: KVSpec, key_alpha: float | None, shifts: bool,
                      cache_kw: str) -> list[KVParams]:
    """Two-dimensional KV quantization of these attention modules, whose inputs `run` produces: key
    smoothing (`smooth_keys`; None: off), then each channel's mid-range as its static shift (keys: in the
    cache; values: folded into the v_proj / o_proj biases). The folds keep the float function."""
    if key_alpha is not None:
        smooth_keys(mods, run, key_alpha)
    params = []
    for m in mods:
        params += attach(m, spec)
    if shifts:
        rec = _Recorder()
        run({cache_kw: rec, "use_cache": True})  # it stores nothing: ranges accumulate over the windows
        for m, p in zip(mods, params):
            idx = m.layer_idx
            p.shift_k.copy_(rec.midrange((idx, "k")).to(p.shift_k.device))
            fold_value_shift(m, rec.midrange((idx, "v")))
    return params


def calibrate(model: nn.Module, windows: torch.Tensor, spec: KVSpec, key_alpha: float | None = 0.5,
              shifts: bool = True, crr: int = 0, crr_steps: int = 16, crr_lr: float = 5e-3) -> list[KVParams]:
    """`calibrate_modules` for a whole model in memory on calibration windows [n, L] (changes it in place
    and attaches the KV parameters). `crr` > 0: block by block, each block's transforms then refined by
    cross-block reconstruction (`crr_block`) through the next `crr` blocks."""
    dev = next(model.parameters()).device
    if not crr:
        def run(extra: dict[str, Any]) -> None:
            for w in windows:
                model(w.unsqueeze(0).to(dev), **({"use_cache": False} | extra))

        return calibrate_modules(attention_modules(model), run, spec, key_alpha, shifts, cache_kwarg(model))
    from .models import find_blocks
    from .pipeline import calibrate_block_kv, capture_block_inputs, propagate

    _, blocks = find_blocks(model)
    chunks = capture_block_inputs(model, blocks, windows, 4, dev)
    out = []
    with torch.no_grad():
        for i, block in enumerate(blocks):
            out += calibrate_block_kv(block, chunks, spec, key_alpha, shifts)
            crr_block(block, list(blocks[i + 1 : i + 1 + crr]), [(c.hidden, c.kwargs, c.device) for c in chunks],
                      crr_steps, crr_lr)
            propagate(block, chunks, i)
    return out


def spec_of(cfg: Any) -> KVSpec:
    """The KVSpec of a CompressConfig (its kv_* fields)."""
    clip = cfg.kv_bits <= 2 if cfg.kv_clip == "auto" else cfg.kv_clip == "on"
    return KVSpec(cfg.kv_bits, cfg.kv_group, cfg.kv_residual, cfg.kv_key_axis, cfg.kv_key_tokens, clip)


# --- cross-block reconstruction (WKVQuant's CRR) --------------------------------------------------

class CRRParams(nn.Module):
    """One attention module's learnable two-dimensional KV transforms: keys / sk - dk (sk one scale per
    rotary pair) and values / sv - dv, quantized after; folded into the projections when trained."""

    def __init__(self, kv: int, D: int, shift_k: torch.Tensor) -> None:
        super().__init__()
        dev = shift_k.device
        self.log_sk = nn.Parameter(torch.zeros(kv, D // 2, device=dev))
        self.dk = nn.Parameter(shift_k.detach().float().clone())
        self.log_sv = nn.Parameter(torch.zeros(kv, D, device=dev))
        self.dv = nn.Parameter(torch.zeros(kv, D, device=dev))

    def key_scale(self) -> torch.Tensor:
        return self.log_sk.exp().repeat(1, 2)  # [kv, D]: channels c and c + D/2 share theirs

    @torch.no_grad()
    def fold(self, attn: nn.Module) -> None:
        """Move the trained transforms into the module: key scales into q_proj / k_proj, the key shift into
        its buffer (the cache subtracts it), value scales into v_proj / o_proj, the value shift into their
        biases. The float module's function is unchanged."""
        fold_key_scale(attn, self.log_sk.exp())
        getattr(attn, SHIFT).copy_(self.dk.to(getattr(attn, SHIFT).dtype))
        fold_value_scale(attn, self.log_sv.exp())
        fold_value_shift(attn, self.dv.float())


def _additive_mask(mask: torch.Tensor | None, T: int, S: int, like: torch.Tensor) -> torch.Tensor | None:
    """An additive float mask [.., T, S] from transformers' (None: causal, as sdpa's is_causal; bool: allowed)."""
    if mask is None:
        if T == 1:
            return None
        i = torch.arange(S - T, S, device=like.device)[:, None]
        allowed = torch.arange(S, device=like.device)[None, :] <= i
    elif mask.dtype == torch.bool:
        allowed = mask
    else:
        return mask
    return torch.zeros(allowed.shape, dtype=like.dtype, device=like.device).masked_fill(~allowed, torch.finfo(like.dtype).min)


def _crr_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, **kwargs: Any):
    """transformers attention function for CRR training: past-only attention over keys and values through
    the module's learnable transforms and differentiable fake quantization; sdpa where none is attached."""
    t: CRRParams | None = getattr(module, "kv_crr", None)
    if t is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    params: KVParams = module.kv_quant
    n = query.shape[1] // key.shape[1]
    sk, sv = t.key_scale().to(key.dtype), t.log_sv.exp().to(value.dtype)
    q = query * sk.repeat_interleave(n, 0)[None, :, None]
    k = key / sk[None, :, None] - t.dk.to(key.dtype)[None, :, None]
    v = value / sv[None, :, None] - t.dv.to(value.dtype)[None, :, None]
    kq, vq = params.fake_keys(k, ste=True), params.fake_values(v, ste=True)
    T, S = query.shape[-2], key.shape[-2]
    full = fp_window(T, S, params.spec.residual, query.device, params.spec.unit)
    o, probs = mixed_attention(q, _repeat(k, n), _repeat(v, n), _repeat(kq, n), _repeat(vq, n), full,
                               _additive_mask(attention_mask, T, S, q), scaling)
    o = (o + t.dv.to(o.dtype).repeat_interleave(n, 0)) * sv.repeat_interleave(n, 0)  # back to the true values
    return o, probs


def _through(blocks: list[nn.Module], x: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    for b in blocks:
        out = b(x, **kwargs)
        x = out[0] if isinstance(out, (tuple, list)) else out
    return x


@contextlib.contextmanager
def _attention(model: nn.Module, name: str) -> Iterator[None]:
    """Within: every attention module under `model` (and all that share their configs) uses `name`."""
    with _using(list({id(c): c for c in (getattr(m, "config", None) for m in attention_modules(model)) if c}.values()),
                name):
        yield


Inputs = list[tuple[torch.Tensor, dict[str, Any], "torch.device | None"]]  # (hidden, kwargs, run device)


def _run(chain: list[nn.Module], item: tuple[torch.Tensor, dict[str, Any], torch.device | None]) -> torch.Tensor:
    x, kw, dev = item
    return _through(chain, x if dev is None else x.to(dev, non_blocking=True), kw)


def crr_block(block: nn.Module, following: list[nn.Module], inputs: Inputs, steps: int,
              lr: float = 5e-3) -> tuple[float, float]:
    """WKVQuant's cross-block reconstruction for the attention of `block` (KV parameters attached): learn its
    K/V transforms (CRRParams) with AdamW so that the output after `following` (the next k full-precision
    blocks) with the quantized cache matches the output without quantization (mean absolute error), one
    input batch per step (hidden states move to the run device a batch at a time); then fold them in, if
    they lowered the loss over the inputs (else the block keeps what it had). Returns that loss before and
    after."""
    mods = [m for m in attention_modules(block) if getattr(m, "kv_quant", None) is not None]
    if not mods or steps <= 0:
        return 0.0, 0.0
    chain = [block, *following]
    with torch.no_grad():
        targets = [_run(chain, it).to(it[0].device) for it in inputs]
    frozen = [p for b in chain for p in b.parameters() if p.requires_grad]
    for m in mods:
        kv, D = head_shape(m)
        m.kv_crr = CRRParams(kv, D, getattr(m, SHIFT))
    trained = [p for m in mods for p in m.kv_crr.parameters()]
    for p in frozen:
        p.requires_grad_(False)
    opt = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)

    def loss_of(i: int) -> torch.Tensor:
        y = _run(chain, inputs[i])
        return (y.float() - targets[i].to(y.device).float()).abs().mean()

    def mean_loss() -> float:
        with torch.no_grad():
            return sum(float(loss_of(i)) for i in range(len(inputs))) / len(inputs)

    try:
        with _attention(block, CRR_ATTN):
            before = mean_loss()
            with torch.enable_grad():
                for step in range(steps):
                    loss = loss_of(step % len(inputs))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            after = mean_loss()
        if after < before:
            for m in mods:
                m.kv_crr.fold(m)
    finally:
        for p in frozen:
            p.requires_grad_(True)
        for m in mods:
            del m.kv_crr
    return before, after
