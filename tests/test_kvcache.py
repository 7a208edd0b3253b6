"""KV-cache quantization (kvcache.py): the round trip's bound, past-only semantics, the one-pass
evaluation against the token-by-token cache, and the folds."""

from __future__ import annotations

import pytest
import torch

from rdquant import kvcache
from rdquant.errors import RdquantError
from rdquant.kvcache import KVSpec, QuantizedKVCache
from rdquant.testing import tiny_model


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [16, 8])
def test_token_round_trip_within_half_a_step(bits, group):
    """Min-max groups (no clipping): every value within half a step of its group's grid."""
    g = torch.Generator().manual_seed(bits + group)
    x = torch.randn(2, 3, 40, 16, generator=g) * torch.linspace(0.1, 5, 16)  # channels of different ranges
    codes, scale, lo = kvcache.quantize_tokens(x, bits, group)
    assert codes.shape == x.shape and scale.shape == (2, 3, 40, 16 // group) and int(codes.max()) < (1 << bits)
    y = kvcache.dequantize_tokens(codes, scale, lo)
    step = scale.float().repeat_interleave(group, -1)
    assert ((x - y).abs() <= step / 2 + 1e-3 * x.abs().amax()).all()
    # packed rows come back as they went in
    packed = kvcache._pack_rows(codes, bits)
    assert packed.shape[-1] == 16 * bits // 8
    assert torch.equal(kvcache._unpack_rows(packed, bits, 16), codes)


@pytest.mark.parametrize("bits", [2, 4])
def test_channel_groups_and_clipping(bits):
    """Keys per channel over groups of tokens round-trip within half a step; clipping never raises a
    group's squared error over min-max's."""
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(1, 2, 32, 16, generator=g) * torch.linspace(0.1, 5, 16)
    codes, scale, lo = kvcache.quantize_channels(x, bits, 8)
    assert scale.shape == (1, 2, 4, 16)
    y = kvcache.dequantize_channels(codes, scale, lo)
    step = scale.float().repeat_interleave(8, 2)
    assert ((x - y).abs() <= step / 2 + 1e-3 * x.abs().amax()).all()
    yc = kvcache.dequantize_channels(*kvcache.quantize_channels(x, bits, 8, clip=True))
    err = lambda z: ((z - x) ** 2).reshape(1, 2, 4, 8, 16).sum(3)
    assert (err(yc) <= err(y) + 1e-6).all()
    if bits == 2:  # at 2 bits a gaussian group's min-max range wastes levels: clipping must find less error
        assert err(yc).sum() < err(y).sum()


def _model(seed=0):
    m = tiny_model("llama", 96, hidden=64, layers=2, seed=seed).float()
    return m


def test_cache_is_past_only_and_packed():
    m = _model()
    params = kvcache.attach(m, KVSpec(bits=3, key_axis="token", clip=False))
    g = torch.Generator().manual_seed(1)
    params[0].shift_k.normal_(generator=g)
    lay = kvcache.QuantizedKVLayer(params[0])
    k1, v1 = torch.randn(1, 2, 5, 16, generator=g), torch.randn(1, 2, 5, 16, generator=g)
    keys, values = lay.update(k1, v1)  # a prefill chunk: itself in full precision (shifted)
    sk, sv = params[0].shifted(k1, v1)
    assert torch.equal(keys, sk) and torch.equal(values, sv)
    k2, v2 = torch.randn(1, 2, 1, 16, generator=g), torch.randn(1, 2, 1, 16, generator=g)
    keys, values = lay.update(k2, v2)
    sk2, sv2 = params[0].shifted(k2, v2)
    assert torch.equal(keys[:, :, -1:], sk2) and torch.equal(values[:, :, -1:], sv2)  # its own K/V exact
    assert torch.allclose(keys[:, :, :5], params[0].fake_keys(sk)) and not torch.equal(keys[:, :, :5], sk)
    assert torch.allclose(values[:, :, :5], params[0].fake_values(sv))
    assert lay.get_seq_length() == 6
    assert lay.nbytes() == 2 * 6 * 2 * (16 * 3 // 8 + 4)  # K and V, 6 tokens, 2 heads: codes + scale + minimum


@pytest.mark.parametrize("spec", [KVSpec(bits=4, key_tokens=4), KVSpec(bits=2, key_tokens=8, residual=3),
                                  KVSpec(bits=4, key_axis="token"), KVSpec(bits=2, group_size=8, key_axis="token", clip=False),
                                  KVSpec(bits=3, residual=3, key_axis="token")],
                         ids=["kv4-channel", "kv2-channel-residual3", "kv4-token", "kv2-token-g8", "kv3-token-residual3"])
def test_one_pass_equals_token_by_token(spec):
    """The evaluation's one pass computes what generation through the cache computes, token by token."""
    m = _model()
    kvcache.attach(m, spec)
    g = torch.Generator().manual_seed(2)
    for p, attn in zip(kvcache.kv_params(m), kvcache.attention_modules(m)):  # shifts as calibration leaves them
        p.shift_k.normal_(generator=g)
        kvcache.fold_value_shift(attn, torch.randn(2, 16, generator=g))
    ids = torch.randint(0, 96, (1, 24), generator=g)
    with torch.no_grad():
        with kvcache.past_only(m):
            one = m(ids, use_cache=False).logits
        cache = QuantizedKVCache(m)
        kw = kvcache.cache_kwarg(m)
        steps = [m(ids[:, t : t + 1], **{kw: cache}, use_cache=True).logits for t in range(ids.shape[1])]
        plain = m(ids, use_cache=False).logits  # the context restored the model's own attention
    steps = torch.cat(steps, 1)
    assert torch.allclose(one, steps, atol=1e-4, rtol=1e-4), float((one - steps).abs().max())
    assert not torch.allclose(one, plain, atol=1e-3)  # the quantization is seen
    assert cache.get_seq_length() == 24


def test_generate_with_the_quantized_cache():
    m = _model()
    kvcache.attach(m, KVSpec(bits=8))
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(3))
    out = m.generate(ids, **{kvcache.cache_kwarg(m): QuantizedKVCache(m)}, max_new_tokens=5, do_sample=False)
    ref = m.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 11) and torch.equal(out, ref)  # 8-bit K/V: the same greedy tokens


def test_folds_keep_the_float_model():
    """Key smoothing (q/k projections) and the value shift (o_proj's bias) leave the function unchanged:
    with the cache in full precision (8 bits and a residual window covering the text) the outputs match."""
    m = _model()
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = m(ids, use_cache=False).logits
        kvcache.calibrate(m, ids, KVSpec(bits=8, residual=64), key_alpha=0.5)
        assert all(bool(p.shift_k.any()) for p in kvcache.kv_params(m))
        assert all(a.v_proj.bias is not None and a.o_proj.bias is not None for a in kvcache.attention_modules(m))
        with kvcache.past_only(m):
            after = m(ids, use_cache=False).logits
        plain = m(ids, use_cache=False).logits
    assert torch.allclose(before, after, atol=1e-4) and torch.allclose(before, plain, atol=1e-4)


@pytest.mark.parametrize("axis", ["token", "channel"])
def test_cross_block_reconstruction_lowers_its_loss_and_keeps_the_float_model(axis):
    """CRR: the loss after the next block falls as the K/V transforms train, and their folds leave the float
    model's function unchanged; the block-wise whole-model calibration attaches every layer."""
    from rdquant.models import find_blocks
    from rdquant.pipeline import capture_block_inputs

    m = _model()
    ids = torch.randint(0, 96, (8, 48), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        before = m(ids, use_cache=False).logits
    _, blocks = find_blocks(m)
    kvcache.attach(blocks[0], KVSpec(bits=2, key_axis=axis, key_tokens=8))
    chunks = capture_block_inputs(m, blocks, ids, 4, torch.device("cpu"))
    shift = blocks[0].self_attn.kv_shift_k.clone()
    lr = 5e-3 if axis == "token" else 1e2  # channel keys: a rate that can only make it worse, so nothing is folded
    first, last = kvcache.crr_block(blocks[0], [blocks[1]], [(c.hidden, c.kwargs, None) for c in chunks], 40, lr)
    if axis == "token":
        assert last < 0.97 * first, (first, last)
        assert not torch.equal(blocks[0].self_attn.kv_shift_k, shift)
    else:
        assert not last < first and torch.equal(blocks[0].self_attn.kv_shift_k, shift)  # worse (or NaN): kept
    assert not hasattr(blocks[0].self_attn, "kv_crr") and m.config._attn_implementation != kvcache.CRR_ATTN
    assert all(p.requires_grad for p in m.parameters())
    with torch.no_grad():
        assert torch.allclose(m(ids, use_cache=False).logits, before, atol=1e-4)
    m2 = _model()
    kvcache.calibrate(m2, ids[:4], KVSpec(bits=4), key_alpha=None, shifts=False, crr=1, crr_steps=2)
    assert len(kvcache.kv_params(m2)) == len(kvcache.attention_modules(m2))
    with torch.no_grad():
        assert torch.allclose(m2(ids, use_cache=False).logits, before, atol=1e-4)


def test_bad_specs_name_the_fix():
    m = _model()
    with pytest.raises(RdquantError, match="--kv-bits 5"):
        kvcache.attach(m, KVSpec(bits=5))
    with pytest.raises(RdquantError, match="--kv-group 5"):
        kvcache.attach(m, KVSpec(group_size=5))
    with pytest.raises(RdquantError, match="no KV quantization"):
        QuantizedKVCache(_model())


@pytest.mark.parametrize("method", [dict(bits=4, group_size=32), dict(method="claq", target_bits=3.1),
                                    dict(bits=4, group_size=32, kv_crr=1, kv_crr_steps=3)], ids=["gptq", "claq", "gptq+crr"])
def test_compressed_artifact_carries_the_kv_cache(tmp_path, tiny_model_dir, method):
    """--kv-bits with a weight method: calibrated per block, saved, loaded, evaluated past-only, generated."""
    import rdquant
    from rdquant.artifact import read_manifest

    cfg = rdquant.CompressConfig(calib_samples=4, calib_seqlen=32, kv_bits=4, kv_shift=True, kv_smooth=0.5, **method)
    cm = rdquant.compress(str(tiny_model_dir), cfg, progress=False)
    out = cm.save(tmp_path / "a")
    man = read_manifest(out)
    assert man["kv_cache"] == {"bits": 4, "group_size": -1, "residual": 0, "key_axis": "channel", "key_tokens": 32,
                               "clip": False} and man["format_version"] == 6
    assert any(k.endswith("self_attn.kv_shift_k") for k in man["tensors"])
    m = rdquant.load(out)
    assert kvcache.has_kv(m) and all(bool(p.shift_k.any()) for p in kvcache.kv_params(m))
    # the loaded model computes what the compressed one did (same shifts, folds and cache)
    ids = torch.randint(0, m.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), kvcache.past_only(m), kvcache.past_only(cm.model):
        assert torch.allclose(m(ids, use_cache=False).logits, cm.model(ids, use_cache=False).logits, atol=1e-4)
    gen = m.generate(ids, **{kvcache.cache_kwarg(m): QuantizedKVCache(m)}, max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 16)
    rep = rdquant.inspect(out)
    assert 0 < rep.kv_bytes_per_token < 0.35 * rep.kv_fp16_bytes_per_token and "KV cache" in rep.table(per_layer=False)
    assert "v_proj / o_proj biases" in rep.exports["gguf"]  # its shifts live in biases the formats lack


def test_config_refuses_bad_kv_options():
    import rdquant

    with pytest.raises(RdquantError, match="method rtn"):
        rdquant.CompressConfig(method="rtn", kv_bits=4)
    with pytest.raises(RdquantError, match="--kv-group"):
        rdquant.CompressConfig(kv_bits=4, kv_group=0)
    with pytest.raises(RdquantError, match="--kv-smooth"):
        rdquant.CompressConfig(kv_bits=4, kv_smooth=2.0)
    with pytest.raises(RdquantError, match="kv_key_tokens is not used by method gptq without --kv-bits"):
        rdquant.config.from_settings({}, {"method": "gptq", "kv_key_tokens": 16})
    with pytest.raises(RdquantError, match="with --kv-key-axis token"):
        rdquant.config.from_settings({}, {"kv_bits": 4, "kv_key_axis": "token", "kv_key_tokens": 16})
