"""Triton kernels, run on the CPU by Triton's interpreter (TRITON_INTERPRET=1) at small shapes: every
width and group size the kernels claim (ragged last groups, symmetric and asymmetric affine grids,
row-cluster cells with width-0 cells, codebooks with 8-bit entries, shares, row scales and outliers)
against the reference dequantize-then-matmul; and whole artifacts of each layout on the triton backend
against `reference`. The GPU speed and the same checks at real shapes are bench/speed.py's."""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

# the interpreter is chosen when triton is first imported (conftest.py sets it before any test module
# imports anything). Only an explicit backend="triton" uses it on the CPU (`auto` takes kernels on CUDA only)
if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="the triton package is not installed (it is in the test extra)")


@pytest.fixture(scope="module")
def kernel():
    """The kernel module, under the interpreter."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before this module could select its CPU interpreter")
    return importlib.import_module("rdquant.kernels.matmul_triton")


def _close(y: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> bool:
    return float((y - ref).abs().max()) <= tol * float(ref.abs().max())


def test_bit_planes_hold_every_width(kernel):
    assert [kernel.planes(b) for b in range(1, 9)] == [(1,), (2,), (2, 1), (4,), (4, 1), (4, 2), (4, 2, 1), (8,)]
    codes = torch.randint(0, 256, (64, 3))
    for b in range(1, 9):
        c = codes % (1 << b)
        got, shift = torch.zeros_like(c), 0
        for p, words in zip(kernel.planes(b), kernel.pack_planes(c, b)):
            cpw = 32 // p
            for i in range(cpw):  # word w holds codes w * cpw + i at bit i * p
                got[i::cpw] |= ((words.to(torch.int64) >> (i * p)) & ((1 << p) - 1)) << shift
            shift += p
        assert torch.equal(got, c), b


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("group", [32, 128, 48, -1])
def test_affine_kernel_matches_the_reference(kernel, bits, group):
    from rdquant.qtensor import QuantizedWeight, num_groups

    g = torch.Generator().manual_seed(bits * 100 + group)
    N, K = 40, 200  # 200 is not a multiple of 32, 64 or 128: ragged last groups; 48 is not a power of two
    n_g = num_groups(K, group)
    for symmetric in (False, True):
        qw = QuantizedWeight(torch.randint(0, 1 << bits, (N, K), generator=g, dtype=torch.uint8),
                             (torch.rand(N, n_g, generator=g) * 0.05 + 0.01).half(),
                             None if symmetric else torch.randint(0, 1 << bits, (N, n_g), generator=g, dtype=torch.uint8),
                             bits, group)
        p = kernel.repack_affine(qw.codes, qw.scales, qw.zeros, bits, group)
        # one GEMV in K slices meeting in an fp32 output (decode), a GEMV per row, the tensor-core path
        for M, split_k in ((1, 3), (3, 1), (17, None)):
            x = torch.randn(M, K, generator=g)
            ref = x @ qw.dequantize().T
            assert _close(kernel.affine_matmul(x, p, block_n=16, split_k=split_k), ref), (symmetric, M, split_k)


def test_segment_kernel_matches_the_reference_on_cluster_cells(kernel):
    from rdquant.layouts import layout_named

    from rdquant.testing import random_mixed

    g = torch.Generator().manual_seed(3)
    w = random_mixed(45, 150, widths=tuple(range(9)), probs=None, cluster_rows=12)  # 4 clusters, the last smaller
    Mixed = layout_named("mixed")
    for block_r, block_k in ((16, 32), (64, 64)):
        p = kernel.repack_segments(w.codes, w.clusters, w.widths, w.scales, w.zeros, block_r=block_r, block_k=block_k)
        assert p.rows.shape[1] == block_r and sorted(int(L.bits) for L in p.launches) == list(range(9))
        for M in (1, 3, 17):
            x = torch.randn(M, w.shape[1], generator=g)
            assert _close(kernel.segment_matmul(x, p), x @ w.dequantize().T), (block_r, M)
    assert _close(Mixed.kernel_linear(x, Mixed.prepare_kernel(w, "triton"), "triton"), x @ w.dequantize().T)


@pytest.mark.parametrize("entries", [16, 8])
@pytest.mark.parametrize("share", [1, 3])
def test_segment_kernel_matches_the_reference_on_codebooks(kernel, entries, share):
    from rdquant.layouts import layout_named
    from rdquant.testing import random_codebook

    g = torch.Generator().manual_seed(entries + share)
    in_f = 100
    w = random_codebook(37, in_f, widths=(0, 1, 2, 3, 4), probs=None, share=share, entry_bits=entries, outliers=9)
    Codebook = layout_named("codebook")
    p = Codebook.prepare_kernel(w, "triton")
    for M in (1, 17):
        x = torch.randn(M, in_f, generator=g)
        assert _close(Codebook.kernel_linear(x, p, "triton"), x @ w.dequantize().T), M


@pytest.mark.parametrize("bits", [1, 3, 4, 8])
@pytest.mark.parametrize("group", [64, 10, -1])
def test_sparse24_kernel_matches_the_reference(bits, group):
    """2:4 layers: kept codes and position nibbles read packed (groups of 10 straddle runs of four)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before this module could select its CPU interpreter")
    from rdquant.kernels.sparse24_triton import repack_sparse24, sparse24_matmul
    from rdquant.qsparse import Sparse24Weight, kept_positions
    from rdquant.qtensor import num_groups

    g = torch.Generator().manual_seed(bits * 100 + group)
    N, K = 40, 200  # K is no multiple of the 64-column step: the last step is masked
    runs = torch.rand(N, K // 4, 4, generator=g)
    keep = torch.zeros_like(runs, dtype=torch.bool).scatter_(-1, runs.topk(2, -1).indices, True).view(N, K)
    n_g = num_groups(K, group)
    for symmetric in (False, True):
        w = Sparse24Weight(torch.randint(0, 1 << bits, (N, K // 2), generator=g, dtype=torch.uint8), kept_positions(keep),
                           (torch.rand(N, n_g, generator=g) * 0.05 + 0.01).half(),
                           None if symmetric else torch.randint(0, 1 << bits, (N, n_g), generator=g, dtype=torch.uint8),
                           bits, group)
        p = repack_sparse24(w.codes, w.idx, w.scales, w.zeros, bits, group)
        for M in (1, 3, 17):  # GEMV per row, and the tensor-core path; one slice, the default, three
            x = torch.randn(M, K, generator=g)
            for split_k in (1, None, 3):
                y = sparse24_matmul(x, p, block_n=16, split_k=split_k)
                assert _close(y, x @ w.dequantize().T), (symmetric, M, split_k)


@pytest.mark.parametrize("method", [dict(bits=3, group_size=48), dict(method="claq", target_bits=3.1),
                                    dict(method="cvxq", target_bits=3.0), dict(method="slim", lowrank=0.25)],
                         ids=["gptq", "claq", "cvxq", "slim+adapters"])
def test_artifact_on_the_triton_backend_matches_reference(kernel, tiny_model_dir, tmp_path, method):
    import rdquant

    cfg = rdquant.CompressConfig(calib_samples=2, calib_seqlen=16, **method)
    out = rdquant.compress(str(tiny_model_dir), cfg, progress=False).save(tmp_path / "a")
    ref = rdquant.load(out, backend="reference")
    fast = rdquant.load(out, backend="triton")
    assert {q.backend for q in fast.modules() if type(q).__name__ == "QuantLinear"} == {"triton"}
    x = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        a, b = ref(x).logits, fast(x).logits
    assert _close(b, a, 1e-4)
    tok = rdquant.load_tokenizer(out)
    enc = tok("the", return_tensors="pt")
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id)
    assert torch.equal(ref.generate(**enc, **kw), fast.generate(**enc, **kw))



@pytest.fixture(scope="module")
def kv_kernel():
    """The packed-KV decode attention kernel module, under the interpreter."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before this module could select its CPU interpreter")
    return importlib.import_module("rdquant.kernels.kv_triton")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("axis", ["channel", "token"])
@pytest.mark.parametrize("group", [8, -1])  # -1: whole-head grids (and key groups of 32 tokens: a tile's rows)
def test_kv_decode_kernel_matches_the_dequantized_past(kv_kernel, bits, axis, group):
    from rdquant.kvcache import (_pack_rows, dequantize_channels, dequantize_tokens, quantize_channels,
                                 quantize_tokens)

    g = torch.Generator().manual_seed(bits)
    B, Hkv, G, D, n, E = 2, 2, 3, 32, 160, 5  # 160 past tokens: a ragged last tile of 64; GQA 3 (padded to 16)
    k, v = torch.randn(B, Hkv, n, D, generator=g), torch.randn(B, Hkv, n, D, generator=g)
    q = torch.randn(B, Hkv * G, D, generator=g).half()
    g_size = D if group == -1 else group
    if axis == "channel":
        kc, ks, kl = quantize_channels(k, bits, 32 if group == -1 else 20)  # 20: groups straddle tiles
        kd = dequantize_channels(kc, ks, kl)
    else:
        kc, ks, kl = quantize_tokens(k, bits, g_size)
        kd = dequantize_tokens(kc, ks, kl)
    vc, vs, vl = quantize_tokens(v, bits, g_size)
    vd = dequantize_tokens(vc, vs, vl)
    ke, ve = torch.randn(B, Hkv, E, D, generator=g).half(), torch.randn(B, Hkv, E, D, generator=g).half()
    scale = D ** -0.5
    kk = torch.cat([kd.half(), ke], 2).repeat_interleave(G, 1).float()
    vv = torch.cat([vd.half(), ve], 2).repeat_interleave(G, 1).float()
    ref = (torch.softmax(q.float()[:, :, None] @ kk.transpose(-1, -2) * scale, -1) @ vv)[:, :, 0]
    for splits in (1, 3):
        o, m, l = kv_kernel.packed_attention(q, _pack_rows(kc, bits), ks, kl, _pack_rows(vc, bits), vs, vl, bits,
                                             (32 if group == -1 else 20) if axis == "channel" else 0, scale,
                                             splits=splits)
        assert o.shape[2] == splits
        out = kv_kernel.merge(o, m, l, q, ke, ve, scale)
        assert _close(out.float(), ref, 2e-3), float((out.float() - ref).abs().max())
    # without exact keys, the packed past alone
    past = (torch.softmax(q.float()[:, :, None] @ kk[:, :, :n].transpose(-1, -2) * scale, -1) @ vv[:, :, :n])[:, :, 0]
    assert _close(kv_kernel.merge(o, m, l, q, None, None, scale).float(), past, 2e-3)


def _count_calls(monkeypatch, cls, name: str) -> list:
    """Calls of cls.name from now on (the method still runs)."""
    calls, real = [], getattr(cls, name)
    monkeypatch.setattr(cls, name, lambda self, *a: calls.append(1) or real(self, *a))
    return calls


@pytest.mark.parametrize("residual", [0, 3])
def test_generate_reads_the_packed_cache_in_the_kernel(kv_kernel, residual, monkeypatch):
    from rdquant import kvcache
    from rdquant.kvcache import DECODE_ATTN, KVSpec, QuantizedKVCache
    from rdquant.testing import tiny_model

    m = tiny_model("llama", 96, hidden=64, layers=2).to(torch.float16)  # 4 heads of 16, 2 KV heads
    kvcache.attach(m, KVSpec(bits=4, residual=residual, key_tokens=4))
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(5))
    kw = dict(max_new_tokens=10, do_sample=False, output_logits=True, return_dict_in_generate=True)
    plain = m.generate(ids, **{kvcache.cache_kwarg(m): QuantizedKVCache(m, fused=False)}, **kw)
    assert m.config._attn_implementation != DECODE_ATTN
    calls = _count_calls(monkeypatch, kvcache.QuantizedKVLayer, "fused_attention")
    fused = m.generate(ids, **{kvcache.cache_kwarg(m): QuantizedKVCache(m, fused=True)}, **kw)
    assert m.config._attn_implementation == DECODE_ATTN and len(calls) == 2 * 9  # every decode step, both layers
    assert torch.equal(fused.sequences, plain.sequences)
    for a, b in zip(fused.logits, plain.logits):
        assert _close(a.float(), b.float(), 1e-2)


def test_fused_kv_cache_refuses_a_model_it_cannot_run():
    from rdquant import kvcache
    from rdquant.errors import RdquantError
    from rdquant.kvcache import KVSpec, QuantizedKVCache
    from rdquant.testing import tiny_model

    m = tiny_model("llama", 96, hidden=64, layers=1)  # float32: the kernel takes 16-bit models only
    kvcache.attach(m, KVSpec(bits=4))
    with pytest.raises(RdquantError, match="16-bit model"):
        QuantizedKVCache(m, fused=True)
    QuantizedKVCache(m)  # auto: falls back to the dequantizing path
    assert m.config._attn_implementation != kvcache.DECODE_ATTN


def test_fused_kv_cache_with_padding_takes_the_masked_path(kv_kernel, monkeypatch):
    """A left-padded batch has a mask at every decode step: the fused attention falls back to the dequantized
    past through sdpa with that mask, and generates what the unfused cache does."""
    from rdquant import kvcache
    from rdquant.kvcache import KVSpec, QuantizedKVCache
    from rdquant.testing import tiny_model

    m = tiny_model("llama", 96, hidden=64, layers=2).to(torch.float16)
    kvcache.attach(m, KVSpec(bits=4, key_tokens=4))
    ids = torch.randint(1, 96, (2, 10), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    plain = m.generate(ids, **{kvcache.cache_kwarg(m): QuantizedKVCache(m, fused=False)}, **kw)
    calls = _count_calls(monkeypatch, kvcache.QuantizedKVLayer, "dequantized_past")
    fused = m.generate(ids, **{kvcache.cache_kwarg(m): QuantizedKVCache(m, fused=True)}, **kw)
    assert calls and torch.equal(fused, plain)
