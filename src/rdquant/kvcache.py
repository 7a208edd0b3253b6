"""Quantized KV cache (WKVQuant): past keys and values stored packed at 2/3/4/8 bits, token-wise
asymmetric groups along head_dim, after a static per-channel shift (two-dimensional quantization).

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


@dataclass(frozen=True)
class KVSpec:
    """How the cache stores K and V: width, group size along head_dim (-1: the whole head) and the
    number of most recent past tokens kept in full precision (0: only the current token)."""

    bits: int = 4
    group_size: int = -1
    residual: int = 0

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

    def group(self, head_dim: int) -> int:
        return head_dim if self.group_size == -1 else self.group_size

    def bytes_per_token(self, head_dim: int, kv_heads: int) -> float:
        """Cache bytes per token per layer for K and V (packed codes plus fp16 scale and minimum per group)."""
        groups = head_dim // self.group(head_dim)
        return 2 * kv_heads * (head_dim * self.bits / 8 + 4 * groups)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


# --- token-wise group quantization ----------------------------------------------------------------

def quantize_tokens(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., D] -> codes uint8 [..., D], scale and minimum fp16 [..., D / group]: asymmetric min-max
    per group of `group` consecutive values. Codes are rounded against the fp16 scale and minimum that
    are stored, so dequantize_tokens is within scale / 2 of x."""
    *lead, D = x.shape
    xg = x.float().reshape(*lead, D // group, group)
    lo = xg.amin(-1).half()
    hi = xg.amax(-1)
    qmax = (1 << bits) - 1
    scale = ((hi - lo.float()) / qmax).clamp_min(1e-8).half()
    codes = ((xg - lo.float()[..., None]) / scale.float()[..., None]).round_().clamp_(0, qmax).to(torch.uint8)
    return codes.reshape(*lead, D), scale, lo


def dequantize_tokens(codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    *lead, D = codes.shape
    group = D // scale.shape[-1]
    x = codes.reshape(*lead, D // group, group).float() * scale.float()[..., None] + lo.float()[..., None]
    return x.reshape(*lead, D).to(dtype)


def fake_quant_tokens(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """x through quantize_tokens and back, in x's dtype (what the cache hands out for a past token)."""
    return dequantize_tokens(*quantize_tokens(x, bits, group), dtype=x.dtype)


# --- per-layer parameters -------------------------------------------------------------------------

class KVParams(nn.Module):
    """One attention layer's KV quantization: the spec and the static per-channel key shift [kv_heads,
    head_dim] subtracted from keys (post-RoPE, as cached) before token-wise quantization."""

    def __init__(self, spec: KVSpec, kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.spec = spec
        self.register_buffer("shift_k", torch.zeros(kv_heads, head_dim))

    def shifted(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k [B, kv_heads, T, D] minus the key shift, and v (what the cache stores and hands out)."""
        return k - self.shift_k[None, :, None, :].to(k.dtype), v

    def fake(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant_tokens(x, self.spec.bits, self.spec.group(x.shape[-1]))


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The model's self-attention modules in layer order (those with k_proj, v_proj, o_proj and a layer_idx)."""
    mods = [m for m in model.modules() if all(hasattr(m, a) for a in ("k_proj", "v_proj", "o_proj", "layer_idx"))]
    return sorted(mods, key=lambda m: m.layer_idx)


def head_shape(model: nn.Module) -> tuple[int, int]:
    """(kv heads, head_dim) of a transformers decoder's config."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    if cfg is None or not hasattr(cfg, "num_attention_heads"):
        raise RdquantError("KV quantization needs a transformers decoder with num_attention_heads in its config")
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    return kv, getattr(cfg, "head_dim", None) or cfg.hidden_size // heads


def attach(model: nn.Module, spec: KVSpec, state: dict[str, torch.Tensor] | None = None) -> list[KVParams]:
    """Give every attention module of `model` a `kv_quant` KVParams (key shifts from `state`, keyed
    `layers.<i>.shift_k`, else zero). Returns them in layer order."""
    kv, hd = head_shape(model)
    spec.check(hd)
    mods = attention_modules(model)
    if not mods:
        raise RdquantError("KV quantization found no attention modules (k_proj / v_proj / o_proj) in this model")
    out = []
    for m in mods:
        p = KVParams(spec, kv, hd).to(m.o_proj.weight.device if hasattr(m.o_proj, "weight") else "cpu")
        t = None if state is None else state.get(f"layers.{m.layer_idx}.shift_k")
        if t is not None:
            p.shift_k.copy_(t)
        m.kv_quant = p
        out.append(p)
    return out


def kv_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The attached key shifts, as `attach` reads them back."""
    return {f"layers.{m.layer_idx}.shift_k": m.kv_quant.shift_k.detach().cpu().float().contiguous()
            for m in attention_modules(model) if getattr(m, "kv_quant", None) is not None}


def kv_params(model: nn.Module) -> list[KVParams]:
    return [m.kv_quant for m in attention_modules(model) if getattr(m, "kv_quant", None) is not None]


# --- the cache -----------------------------------------------------------------------------------

class _Packed:
    """A growing store of one tensor's packed tokens [B, H, T, ...] (capacity doubles as it fills)."""

    def __init__(self) -> None:
        self.codes: torch.Tensor | None = None  # [B, H, cap, D * bits / 8] uint8
        self.scale: torch.Tensor | None = None  # [B, H, cap, groups] fp16
        self.lo: torch.Tensor | None = None
        self.n = 0

    def append(self, codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor) -> None:
        t = codes.shape[2]
        if self.codes is None or self.n + t > self.codes.shape[2]:
            cap = max(2 * (self.n + t), 64)
            grow = lambda old, new: new if old is None else torch.cat([old[:, :, : self.n], new[:, :, : cap - self.n]], 2)
            self.codes = grow(self.codes, codes.new_zeros(*codes.shape[:2], cap, codes.shape[3]))
            self.scale = grow(self.scale, scale.new_zeros(*scale.shape[:2], cap, scale.shape[3]))
            self.lo = grow(self.lo, lo.new_zeros(*lo.shape[:2], cap, lo.shape[3]))
        self.codes[:, :, self.n : self.n + t] = codes
        self.scale[:, :, self.n : self.n + t] = scale
        self.lo[:, :, self.n : self.n + t] = lo
        self.n += t

    def nbytes(self) -> int:
        return sum(t[:, :, : self.n].numel() * t.element_size() for t in (self.codes, self.scale, self.lo) if t is not None)


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

    def __init__(self, params: KVParams) -> None:
        super().__init__()
        self.params = params
        self.k, self.v = _Packed(), _Packed()
        self.rk: torch.Tensor | None = None  # the full-precision window [B, H, <= residual, D]
        self.rv: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
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
        spec, D = self.params.spec, k.shape[-1]
        g = spec.group(D)
        for store, x in ((self.k, k), (self.v, v)):
            codes, scale, lo = quantize_tokens(x, spec.bits, g)
            store.append(_pack_rows(codes, spec.bits), scale, lo)

    def _past(self, store: _Packed, window: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        parts = []
        if store.n:
            D = like.shape[-1]
            codes = _unpack_rows(store.codes[:, :, : store.n].contiguous(), self.params.spec.bits, D)
            parts.append(dequantize_tokens(codes, store.scale[:, :, : store.n], store.lo[:, :, : store.n], like.dtype))
        if window is not None:
            parts.append(window)
        return torch.cat(parts, 2) if parts else like[:, :, :0]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys/values to attend over: the dequantized past, the window, then this chunk in full
        precision (all shifted); then the chunk joins the window and what leaves it is quantized."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        k, v = self.params.shifted(key_states, value_states)
        keys = torch.cat([self._past(self.k, self.rk, k), k], 2)
        values = torch.cat([self._past(self.v, self.rv, v), v], 2)
        wk = k if self.rk is None else torch.cat([self.rk, k], 2)
        wv = v if self.rv is None else torch.cat([self.rv, v], 2)
        out = wk.shape[2] - self.params.spec.residual
        if out > 0:
            self._store(wk[:, :, :out], wv[:, :, :out])
            wk, wv = wk[:, :, out:], wv[:, :, out:]
        self.rk, self.rv = (wk, wv) if wk.shape[2] else (None, None)
        return keys, values

    def nbytes(self) -> int:
        fp = sum(t.numel() * t.element_size() for t in (self.rk, self.rv) if t is not None)
        return self.k.nbytes() + self.v.nbytes() + fp


def _cache_base():
    from transformers.cache_utils import Cache

    return Cache


class QuantizedKVCache(_cache_base()):  # type: ignore[misc]
    """A transformers Cache whose layers store K/V quantized (past-only). Build it from a model that has
    KV parameters attached (`attach`, or an artifact compressed with --kv-bits):
    `model.generate(..., past_key_values=QuantizedKVCache(model))`."""

    def __init__(self, model: nn.Module) -> None:
        params = kv_params(model)
        if not params:
            raise RdquantError("this model has no KV quantization attached: compress with --kv-bits, or call "
                               "rdquant.kvcache.attach(model, KVSpec(...)) first")
        super().__init__(layers=[QuantizedKVLayer(p) for p in params])

    def nbytes(self) -> int:
        """Bytes the cache holds now (packed codes, scales, minimums and the full-precision window)."""
        return sum(lay.nbytes() for lay in self.layers)


# --- one-pass past-only attention ----------------------------------------------------------------

def fp_window(T: int, S: int, residual: int, device: torch.device) -> torch.Tensor:
    """[T, S] True where query i (the last T of S positions) sees key j in full precision: j itself and
    the `residual` tokens before it; earlier keys are seen quantized."""
    i = torch.arange(S - T, S, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    return (i - j >= 0) & (i - j <= residual)


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
        kq, vq = params.fake(k), params.fake(v)
        full = fp_window(query.shape[-2], key.shape[-2], params.spec.residual, query.device)
    return mixed_attention(query, _repeat(k, n), _repeat(v, n), _repeat(kq, n), _repeat(vq, n), full,
                           attention_mask, scaling)


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, _past_only_attention)
    try:  # the masks this function takes: the eager (additive float) ones
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, eager_mask)
    except ImportError:  # pragma: no cover - older transformers
        pass


@contextlib.contextmanager
def past_only(model: nn.Module) -> Iterator[None]:
    """Within: a forward without a cache computes each position as the quantized cache would (one pass)."""
    _register()
    configs = [c for c in {id(c): c for c in (model.config, getattr(model.config, "text_config", None)) if c}.values()]
    before = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation = ATTN_NAME
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


@torch.no_grad()
def smooth_keys(model: nn.Module, windows: torch.Tensor, alpha: float = 0.5) -> int:
    """Per-channel key scales folded into k_proj (divide) and q_proj (multiply): scores are unchanged and the
    cached keys' channels come closer in range, so token-wise groups lose less to outlier channels. A
    scale is shared by each rotary pair (channels c and c + D/2 rotate together, so RoPE commutes with
    it); it is max|k|^alpha / max|q|^(1 - alpha) over the pair's norm. Skipped for attention with a norm
    on q/k (its output does not scale with the projection). Returns the layers smoothed."""
    kv, D = head_shape(model)
    mods = [m for m in attention_modules(model) if not (hasattr(m, "q_norm") or hasattr(m, "k_norm"))]
    if not mods:
        return 0
    peaks: dict[int, dict[str, torch.Tensor]] = {}

    def hook(idx: int, name: str):
        def f(_mod, _inp, out):
            x = out.detach().float().reshape(-1, out.shape[-1] // D, D)
            pair = (x[..., : D // 2] ** 2 + x[..., D // 2 :] ** 2).sqrt().amax(0)  # [heads, D/2]
            d = peaks.setdefault(idx, {})
            d[name] = pair if name not in d else torch.maximum(d[name], pair)
        return f

    handles = [h for m in mods for h in (m.q_proj.register_forward_hook(hook(m.layer_idx, "q")),
                                         m.k_proj.register_forward_hook(hook(m.layer_idx, "k")))]
    try:
        dev = next(model.parameters()).device
        for w in windows:
            model(w.unsqueeze(0).to(dev), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    for m in mods:
        pk = peaks[m.layer_idx]["k"].clamp_min(1e-5)  # [kv, D/2]
        heads = peaks[m.layer_idx]["q"].shape[0]
        n = heads // kv
        pq = peaks[m.layer_idx]["q"].reshape(kv, n, D // 2).amax(1).clamp_min(1e-5)
        s = pk ** alpha / pq ** (1 - alpha)
        s = torch.cat([s, s], -1)  # [kv, D]: the pair's two channels
        for proj, scale in ((m.k_proj, 1 / s.reshape(-1)), (m.q_proj, _rep_heads(s, n))):
            proj.weight.data *= scale.to(proj.weight.dtype)[:, None].to(proj.weight.device)
            if proj.bias is not None:
                proj.bias.data *= scale.to(proj.bias.dtype).to(proj.bias.device)
    return len(mods)


class _Recorder(_cache_base()):  # type: ignore[misc]
    """A cache that keeps nothing and records each layer's per-channel min and max of K and V."""

    def __init__(self, layers: int) -> None:
        super().__init__(layers=[_dynamic_layer()() for _ in range(layers)])
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


@torch.no_grad()
def calibrate(model: nn.Module, windows: torch.Tensor, spec: KVSpec, key_alpha: float | None = 0.5,
              shifts: bool = True) -> list[KVParams]:
    """Two-dimensional KV quantization on calibration windows [n, L]: key smoothing (`smooth_keys`, None:
    off), then each channel's mid-range as its static shift (keys: in the cache; values: folded into the
    v_proj / o_proj biases). Changes the float model in place (the folds keep its function) and attaches
    the KV parameters."""
    if key_alpha is not None:
        smooth_keys(model, windows, key_alpha)
    params = attach(model, spec)
    if not shifts:
        return params
    mods = attention_modules(model)
    rec = _Recorder(len(mods))
    dev = next(model.parameters()).device
    for w in windows:
        model(w.unsqueeze(0).to(dev), past_key_values=rec, use_cache=True)  # it stores nothing: ranges accumulate
    for m, p in zip(mods, params):
        idx = m.layer_idx
        p.shift_k.copy_((rec.lo[(idx, "k")] + rec.hi[(idx, "k")]) / 2)
        fold_value_shift(m, (rec.lo[(idx, "v")] + rec.hi[(idx, "v")]) / 2)
    return params
