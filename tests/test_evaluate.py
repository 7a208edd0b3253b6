"""Perplexity: the chunked loss equals the full-logits loss, never builds [seqlen, vocab] logits, and
bad arguments are refused before any work."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import rdquant
from rdquant.evaluate import window_nll
from rdquant.models import load_model


def _full_nll(model, x):
    logits = model(x, use_cache=False).logits[0, :-1].float()
    return float(F.cross_entropy(logits, x[0, 1:], reduction="sum"))


@torch.inference_mode()
def test_chunked_loss_equals_full_logits_and_bounds_their_size(tiny_model_dir):
    model, tok, _ = load_model(tiny_model_dir)
    x = torch.randint(0, len(tok), (1, 300))
    head = model.get_output_embeddings()
    largest = []
    hook = head.register_forward_hook(lambda m, i, o: largest.append(o.shape[-2] if o.dim() > 1 else 1))
    try:
        for chunk in (1, 7, 64, 256, 1000):
            largest.clear()
            got = window_nll(model, x, chunk)
            assert max(largest) <= min(chunk, 299)
            hook.remove()
            ref = _full_nll(model, x)
            hook = head.register_forward_hook(lambda m, i, o: largest.append(o.shape[-2] if o.dim() > 1 else 1))
            assert math.isclose(got, ref, rel_tol=1e-6), (chunk, got, ref)
    finally:
        hook.remove()


@torch.inference_mode()
def test_models_whose_forward_transforms_logits_take_the_full_path(tiny_model_dir):
    model, tok, _ = load_model(tiny_model_dir)
    model.config.final_logit_softcapping = 30.0  # the forward would apply it; the decoder+head path would not
    x = torch.randint(0, len(tok), (1, 40))
    calls = []
    hook = model.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        window_nll(model, x, 8)
    finally:
        hook.remove()
    assert calls == [1]


def test_evaluate_refuses_bad_arguments(tiny_model_dir, text_file):
    model, tok, _ = load_model(tiny_model_dir)
    with pytest.raises(rdquant.RdquantError, match="max_windows must be at least 1"):
        rdquant.evaluate(model, tok, data=str(text_file), seqlen=32, max_windows=-3)
    with pytest.raises(rdquant.RdquantError, match="longer than the model's context"):
        rdquant.evaluate(model, tok, data=str(text_file), seqlen=100_000)


def test_auto_backend_caches_only_where_memory_allows(tiny_model_dir, tmp_path, monkeypatch):
    import rdquant.backends as backends

    cfg = rdquant.CompressConfig(bits=4, group_size=32, calib_samples=2, calib_seqlen=16)
    out = rdquant.compress(str(tiny_model_dir), cfg, progress=False).save(tmp_path / "a")
    monkeypatch.setattr(backends, "available_memory", lambda device: 10**12)
    m = rdquant.load(out)
    assert {q.backend for q in m.modules() if type(q).__name__ == "QuantLinear"} == {"cached"}
    monkeypatch.setattr(backends, "available_memory", lambda device: 1000)
    m = rdquant.load(out)
    assert {q.backend for q in m.modules() if type(q).__name__ == "QuantLinear"} == {"reference"}
    m = rdquant.load(out, backend="reference")
    with pytest.raises(rdquant.RdquantError, match="unknown backend"):
        rdquant.load(out, backend="fast")
