"""Decode attention over the packed KV cache (kvcache.QuantizedKVLayer; Triton): one query token per
sequence attends to the quantized past read straight from its packed code rows and fp16 grids, never a
dequantized copy.

Split-K (flash-decoding): program (batch x KV head, split) walks its split of the past BLOCK_N tokens at a
time; it unpacks the tile's key and value codes (LSB-first bit stream per token row, packing.pack's
order), applies the grids (keys per channel over groups of key_tokens tokens, or token-wise groups along
head_dim; values token-wise), and keeps an online softmax for the KV head's GQA query heads together
(the tile is read once for all of them). The splits' partial sums are then merged with the exact part of
the attention (the residual window and the current token, kept in 16 bits) in torch.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

MIN_G = 16  # tl.dot's smallest M: the query heads of one KV head are padded to it
# launch defaults: past tokens per tile, warps, programs per multiprocessor (sets the splits), pipeline stages
CONFIG = dict(block_n=64, num_warps=4, per_sm=8, num_stages=2)


@triton.jit
def _codes(ptr, rows, d, nmask, BITS: tl.constexpr, ROW_BYTES: tl.constexpr):
    """Codes [BLOCK_N, D] (fp32) of the code rows starting at ptr + rows [BLOCK_N], channels d [D]."""
    bit = d * BITS
    byte = bit // 8
    shift = bit % 8
    lo = tl.load(ptr + rows[:, None] + byte[None, :], mask=nmask[:, None], other=0).to(tl.int32)
    if (8 % BITS) != 0:  # a code may straddle two bytes
        hmask = nmask[:, None] & ((byte + 1) < ROW_BYTES)[None, :]
        lo = lo | (tl.load(ptr + rows[:, None] + byte[None, :] + 1, mask=hmask, other=0).to(tl.int32) << 8)
    return ((lo >> shift[None, :]) & ((1 << BITS) - 1)).to(tl.float32)


@triton.jit
def _word_codes(ptr, rows, nmask, BITS: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Codes [BLOCK_N, D] (fp32) of code rows read as int32 words (rows [BLOCK_N] in words; 32 % BITS == 0):
    word w holds codes w * 32 / BITS + i at bit i * BITS (little-endian bytes, packing.pack's order)."""
    PER: tl.constexpr = 32 // BITS
    W: tl.constexpr = D // PER
    words = tl.load(ptr + rows[:, None] + tl.arange(0, W)[None, :], mask=nmask[:, None], other=0)
    c = (words[:, :, None] >> (tl.arange(0, PER) * BITS)[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(c, (BLOCK_N, D)).to(tl.float32)


@triton.jit
def _kv_decode_kernel(q_ptr, kc_ptr, ks_ptr, kl_ptr, vc_ptr, vs_ptr, vl_ptr, o_ptr, m_ptr, l_ptr,
                      N, per_split, scaling,
                      sq_b, sq_h, skc_b, skc_h, skc_n, sks_b, sks_h, sks_r, svc_b, svc_h, svc_n, svs_b, svs_h, svs_n,
                      so_b, so_h, so_s, sm_b, sm_h,
                      HKV: tl.constexpr, GQA: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
                      KEY_TOKENS: tl.constexpr, KGROUP: tl.constexpr, VGROUP: tl.constexpr, WORDS: tl.constexpr,
                      BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr):
    """Partial attention of the GQA query heads of KV head (pid 0 % HKV) of sequence (pid 0 // HKV) over
    past tokens [pid 1 * per_split, + per_split): unnormalised output [G, D], running max and sum [G].
    KEY_TOKENS > 0: keys have one grid per channel per KEY_TOKENS tokens; 0: token-wise groups of KGROUP.
    WORDS: the code pointers are int32 and their row strides in words (widths that divide 32)."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // HKV
    h = pid % HKV
    g = tl.arange(0, BLOCK_G)
    gmask = g < GQA
    d = tl.arange(0, D)
    ROW_BYTES: tl.constexpr = D * BITS // 8
    q = tl.load(q_ptr + b * sq_b + (h * GQA + g)[:, None] * sq_h + d[None, :], mask=gmask[:, None], other=0.0)
    q = (q.to(tl.float32) * scaling).to(q_ptr.dtype.element_ty)
    start = split * per_split
    stop = tl.minimum(start + per_split, N)
    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, D), tl.float32)
    kc = kc_ptr + b * skc_b + h * skc_h
    vc = vc_ptr + b * svc_b + h * svc_h
    ks = ks_ptr + b * sks_b + h * sks_h
    kl = kl_ptr + b * sks_b + h * sks_h
    vs = vs_ptr + b * svs_b + h * svs_h
    vl = vl_ptr + b * svs_b + h * svs_h
    for n0 in range(start, stop, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < stop
        if WORDS:
            k = _word_codes(kc, n * skc_n, nmask, BITS, D, BLOCK_N)
        else:
            k = _codes(kc, n * skc_n, d, nmask, BITS, ROW_BYTES)
        if KEY_TOKENS > 0 and BLOCK_N % KEY_TOKENS == 0:  # the tile's whole key groups: one grid row each
            R: tl.constexpr = BLOCK_N // KEY_TOKENS
            r = n0 // KEY_TOKENS + tl.arange(0, R)
            at = r[:, None] * sks_r + d[None, :]
            rmask = (r * KEY_TOKENS < stop)[:, None]
            sc = tl.load(ks + at, mask=rmask, other=0.0).to(tl.float32)
            lo = tl.load(kl + at, mask=rmask, other=0.0).to(tl.float32)
            k = tl.reshape(tl.reshape(k, (R, KEY_TOKENS, D)) * sc[:, None, :] + lo[:, None, :], (BLOCK_N, D))
        elif KEY_TOKENS == 0 and KGROUP == D:  # token-wise keys, one grid per head
            k = k * tl.load(ks + n * sks_r, mask=nmask, other=0.0).to(tl.float32)[:, None] \
                + tl.load(kl + n * sks_r, mask=nmask, other=0.0).to(tl.float32)[:, None]
        else:
            if KEY_TOKENS > 0:
                at = (n // KEY_TOKENS)[:, None] * sks_r + d[None, :]
            else:
                at = n[:, None] * sks_r + (d // KGROUP)[None, :]
            k = k * tl.load(ks + at, mask=nmask[:, None], other=0.0).to(tl.float32) \
                + tl.load(kl + at, mask=nmask[:, None], other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k.to(q.dtype)))  # [G, BLOCK_N]
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if WORDS:
            v = _word_codes(vc, n * svc_n, nmask, BITS, D, BLOCK_N)
        else:
            v = _codes(vc, n * svc_n, d, nmask, BITS, ROW_BYTES)
        if VGROUP == D:  # one grid per token and head
            v = v * tl.load(vs + n * svs_n, mask=nmask, other=0.0).to(tl.float32)[:, None] \
                + tl.load(vl + n * svs_n, mask=nmask, other=0.0).to(tl.float32)[:, None]
        else:
            vat = n[:, None] * svs_n + (d // VGROUP)[None, :]
            v = v * tl.load(vs + vat, mask=nmask[:, None], other=0.0).to(tl.float32) \
                + tl.load(vl + vat, mask=nmask[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
        m_i = m_new
    qh = h * GQA + g
    tl.store(o_ptr + b * so_b + qh[:, None] * so_h + split * so_s + d[None, :], acc, mask=gmask[:, None])
    tl.store(m_ptr + b * sm_b + qh * sm_h + split, m_i, mask=gmask)
    tl.store(l_ptr + b * sm_b + qh * sm_h + split, l_i, mask=gmask)


def supported(head_dim: int, bits: int, dtype: torch.dtype) -> bool:
    """Whether the kernel takes this cache: a power-of-two head size of at least 16, 16-bit queries."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0 and bits in (2, 3, 4, 8) \
        and dtype in (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def splits_for(programs: int, n: int, device: torch.device, per_sm: int, block_n: int) -> int:
    """Splits of the past so that about `per_sm` programs run per multiprocessor, each with >= one tile."""
    return max(1, min(triton.cdiv(per_sm * _multiprocessors(device), programs), triton.cdiv(n, block_n)))


def packed_attention(q: torch.Tensor, k_codes: torch.Tensor, k_scale: torch.Tensor, k_lo: torch.Tensor,
                     v_codes: torch.Tensor, v_scale: torch.Tensor, v_lo: torch.Tensor, bits: int, key_tokens: int,
                     scaling: float, splits: int | None = None, **config: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split partial attention of q [B, Hq, D] over the packed past: code rows [B, Hkv, n, D * bits / 8]
    (uint8; any strides with contiguous rows), key grids [B, Hkv, n / key_tokens, D] (key_tokens > 0) or
    [B, Hkv, n, D / group] (key_tokens 0), value grids [B, Hkv, n, D / group]. Returns unnormalised outputs
    [B, Hq, S, D] and the running max and sum [B, Hq, S] (fp32) of S splits. `config` overrides CONFIG."""
    cfg = {**CONFIG, **config}
    B, Hq, D = q.shape
    Hkv, n = k_codes.shape[1], k_codes.shape[2]
    assert n > 0 and Hq % Hkv == 0 and k_codes.shape[-1] * 8 == D * bits, (q.shape, k_codes.shape, bits)
    gqa, bn = Hq // Hkv, cfg["block_n"]
    S = splits or splits_for(B * Hkv, n, q.device, cfg["per_sm"], bn)
    per = triton.cdiv(triton.cdiv(n, S), bn) * bn
    S = triton.cdiv(n, per)  # every split holds at least one token
    o = torch.empty(B, Hq, S, D, device=q.device, dtype=torch.float32)
    m = torch.empty(B, Hq, S, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    kgroup = D if key_tokens else D // k_scale.shape[-1]
    for t in (k_codes, v_codes, k_scale, k_lo, v_scale, v_lo):
        assert t.stride(-1) == 1, "rows must be contiguous"
    assert k_scale.stride() == k_lo.stride() and v_scale.stride() == v_lo.stride()
    words = 32 % bits == 0 and k_codes.shape[-1] % 4 == 0 and all(
        t.stride(i) % 4 == 0 and t.data_ptr() % 4 == 0 for t in (k_codes, v_codes) for i in range(3))
    if words:  # the same bytes as int32 words (strides in words)
        k_codes, v_codes = k_codes.view(torch.int32), v_codes.view(torch.int32)
    q = q.contiguous()
    _kv_decode_kernel[(B * Hkv, S)](
        q, k_codes, k_scale, k_lo, v_codes, v_scale, v_lo, o, m, l, n, per, scaling,
        q.stride(0), q.stride(1), k_codes.stride(0), k_codes.stride(1), k_codes.stride(2),
        k_scale.stride(0), k_scale.stride(1), k_scale.stride(2), v_codes.stride(0), v_codes.stride(1), v_codes.stride(2),
        v_scale.stride(0), v_scale.stride(1), v_scale.stride(2), o.stride(0), o.stride(1), o.stride(2),
        m.stride(0), m.stride(1),
        HKV=Hkv, GQA=gqa, D=D, BITS=bits, KEY_TOKENS=key_tokens, KGROUP=kgroup, VGROUP=D // v_scale.shape[-1],
        WORDS=words, BLOCK_G=max(MIN_G, triton.next_power_of_2(gqa)), BLOCK_N=bn,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return o, m, l


def merge(o: torch.Tensor, m: torch.Tensor, l: torch.Tensor, q: torch.Tensor, k: torch.Tensor | None,
          v: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """Softmax attention output [B, Hq, D] (q's dtype) from the packed past's split partials and the exact
    keys/values k, v [B, Hkv, E, D] (the residual window and the current token; None: none)."""
    if k is not None and k.shape[2]:
        n = q.shape[1] // k.shape[1]
        ke, ve = k.repeat_interleave(n, 1).float(), v.repeat_interleave(n, 1).float()
        s = torch.einsum("bhd,bhed->bhe", q.float() * scaling, ke)  # [B, Hq, E]
        top = torch.maximum(m.amax(-1), s.amax(-1))
        ps = torch.exp(s - top[..., None])
        num = torch.einsum("bhe,bhed->bhd", ps, ve)
        den = ps.sum(-1)
    else:
        top = m.amax(-1)
        num, den = 0.0, 0.0
    w = torch.exp(m - top[..., None])  # [B, Hq, S]
    num = num + torch.einsum("bhs,bhsd->bhd", w, o)
    den = den + (w * l).sum(-1)
    return (num / den[..., None]).to(q.dtype)
