"""Perplexity: the chunked loss equals the full-logits loss, never builds [seqlen, vocab] logits, and
bad arguments are refused before any work."""

from __future__ import annotations

import importlib
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import rdquant
from rdquant.evaluate import loss_parts, window_nll
from rdquant.models import load_model

evaluate_module = importlib.import_module("rdquant.evaluate")  # rdquant.evaluate is also the function


def _full_nll(model, x):
    logits = model(x, use_cache=False).logits[0, :-1].float()
    return float(F.cross_entropy(logits, x[0, 1:], reduction="sum"))


@torch.inference_mode()
def test_chunked_loss_equals_full_logits_and_bounds_their_size(tiny_model_dir):
    model, tok, _ = load_model(tiny_model_dir)
    # the model's vocabulary: qwen2's tokenizer class adds <|endoftext|> on reload (401 tokens for 400 rows)
    x = torch.randint(0, model.config.vocab_size, (1, 300))
    ref = _full_nll(model, x)
    parts = loss_parts(model, x[:, :16])
    assert parts is not None
    rows = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: rows.append(o.shape[-2]))
    try:
        for chunk in (1, 7, 64, 256, 1000):
            rows.clear()
            got = window_nll(model, x, parts, chunk)
            assert max(rows) <= min(chunk, 299)  # the head never gives more than `chunk` positions
            assert math.isclose(got, ref, rel_tol=1e-6), (chunk, got, ref)
    finally:
        hook.remove()


@torch.inference_mode()
def test_models_whose_forward_transforms_logits_take_the_full_path(tiny_model_dir, monkeypatch):
    """A config naming a logit transform (its forward would apply it, head(decoder) would not) takes
    whole logits: a soft cap of any value (tanh(x / 1) is no identity), a scale other than 1, also in
    the text config where multimodal models keep them."""
    model, tok, _ = load_model(tiny_model_dir)
    x = torch.randint(0, model.config.vocab_size, (1, 16))
    assert loss_parts(model, x) is not None
    for cap in (30.0, 1.0):
        monkeypatch.setattr(model.config, "final_logit_softcapping", cap, raising=False)
        assert loss_parts(model, x) is None, cap
    monkeypatch.undo()
    text_config = SimpleNamespace(logit_scale=0.0625)
    monkeypatch.setattr(type(model.config), "get_text_config", lambda self, *a, **k: text_config)
    assert loss_parts(model, x) is None
    text_config.logit_scale = 1.0
    assert loss_parts(model, x) is not None


@torch.inference_mode()
def test_a_forward_that_transforms_logits_unannounced_takes_the_full_path(tiny_model_dir):
    """Falcon-H1 multiplies its logits by a module attribute no list of config keys would name: the
    probe (head(decoder) against the forward on a few tokens) catches it."""
    model, tok, _ = load_model(tiny_model_dir)
    x = torch.randint(0, model.config.vocab_size, (1, 40))
    assert loss_parts(model, x[:, :16]) is not None
    forward = model.forward

    def scaled(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits * 0.04
        return out

    model.forward = scaled
    assert loss_parts(model, x[:, :16]) is None
    assert math.isclose(window_nll(model, x, None, 8), _full_nll(model, x), rel_tol=1e-6)


def _ppl_chunked_and_full(model, tok, text_file, monkeypatch):
    """evaluate's perplexity taken in chunks of 16 positions (and the most rows the head gave at once
    meanwhile), then with the forward's whole logits."""
    args = dict(data=str(text_file), seqlen=64, max_windows=3, progress=False)
    rows = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: rows.append(o.shape[-2]))
    try:
        chunked = rdquant.evaluate(model, tok, chunk=16, **args)
    finally:
        hook.remove()
    with monkeypatch.context() as m:
        m.setattr(evaluate_module, "loss_parts", lambda model, probe: None)
        full = rdquant.evaluate(model, tok, **args)
    assert chunked.windows == full.windows == 3
    return chunked.ppl, full.ppl, max(rows)


def test_evaluate_in_chunks_gives_the_full_logits_perplexity(tiny_model_dir, text_file, tmp_path, monkeypatch):
    """Original and compressed (QuantLinear) models: same perplexity to 1e-6, never 64 x vocab logits."""
    model, tok, _ = load_model(tiny_model_dir)
    chunked, full, rows = _ppl_chunked_and_full(model, tok, text_file, monkeypatch)
    assert math.isclose(chunked, full, rel_tol=1e-6) and rows == 16  # the probe's 16 rows included
    cfg = rdquant.CompressConfig(bits=3, group_size=32, calib_samples=2, calib_seqlen=16)
    out = rdquant.compress(model, cfg, tokenizer=tok, progress=False).save(tmp_path / "a")
    qmodel, qtok = evaluate_module.load_any(str(out), backend="reference")
    chunked, full, rows = _ppl_chunked_and_full(qmodel, qtok, text_file, monkeypatch)
    assert math.isclose(chunked, full, rel_tol=1e-6) and rows == 16


def test_evaluate_refuses_bad_arguments(tiny_model_dir, text_file):
    model, tok, _ = load_model(tiny_model_dir)
    with pytest.raises(rdquant.RdquantError, match="max_windows must be at least 1"):
        rdquant.evaluate(model, tok, data=str(text_file), seqlen=32, max_windows=-3)
    with pytest.raises(rdquant.RdquantError, match="longer than the model's context"):
        rdquant.evaluate(model, tok, data=str(text_file), seqlen=100_000)


def test_auto_backend_caches_only_where_memory_allows(tiny_model_dir, tmp_path, monkeypatch):
    import rdquant.backends as backends

    cfg = rdquant.CompressConfig(bits=3, group_size=32, calib_samples=2, calib_seqlen=16)  # no CPU kernel
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


def _bos_tokenizer():
    """The tiny tokenizer, made to put a BOS token (id 1) before every text, as Llama-family ones do."""
    from tokenizers.processors import TemplateProcessing

    from rdquant.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<eos> $A", special_tokens=[("<eos>", 1)])
    tok.bos_token = "<eos>"
    return tok


def test_windows_start_with_bos_where_the_tokenizer_adds_one(tiny_model_dir, text_file):
    from rdquant.data import bos_id, calibration_windows, eval_windows

    plain, bos = load_model(tiny_model_dir)[1], _bos_tokenizer()
    assert bos_id(plain) is None and bos_id(bos) == 1
    text = text_file.read_text()
    w_plain, w_bos = eval_windows(plain, text, 32), eval_windows(bos, text, 32)
    ids = plain(text, return_tensors="pt")["input_ids"][0]
    assert torch.equal(w_plain.flatten(), ids[: w_plain.numel()])  # unchanged where no BOS is added
    text_ids = bos(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    assert (w_bos[:, 0] == 1).all() and torch.equal(w_bos[:, 1:].flatten(), text_ids[: w_bos.shape[0] * 31])
    cal = calibration_windows(bos, None, 4, 32)
    assert cal.shape == (4, 32) and (cal[:, 0] == 1).all() and not (calibration_windows(plain, None, 4, 32)[:, 0] == 1).all()
    model = load_model(tiny_model_dir)[0]
    r = rdquant.evaluate(model, bos, data=str(text_file), seqlen=32, max_windows=3, progress=False)
    assert r.windows == 3 and r.predicted == 3 * 31
    with torch.no_grad():  # each window scored from its BOS
        nll = sum(F.cross_entropy(model(w_bos[i : i + 1]).logits[0, :-1], w_bos[i, 1:], reduction="sum") for i in range(3))
    assert math.isclose(r.nll, float(nll) / (3 * 31), rel_tol=1e-5)


def test_short_calibration_windows_on_a_sliding_window_model_are_named(capsys):
    from rdquant.compress import warn_short_windows

    warn_short_windows(SimpleNamespace(sliding_window=64, use_sliding_window=True), 32)
    assert "shorter than this model's sliding attention window (64); --calib-seqlen 64" in capsys.readouterr().err
    for cfg in (SimpleNamespace(sliding_window=64, use_sliding_window=False), SimpleNamespace(sliding_window=None),
                SimpleNamespace(sliding_window=16, use_sliding_window=True)):
        warn_short_windows(cfg, 32)
        assert capsys.readouterr().err == ""


def test_claq_with_few_calibration_tokens_is_warned_about(capsys):
    from rdquant.compress import warn_few_tokens
    from rdquant.config import CompressConfig

    warn_few_tokens(CompressConfig(method="claq", bits=3), 16 * 512)
    assert "8,192 calibration tokens; CLAQ was measured to lose to GPTQ" in capsys.readouterr().err
    warn_few_tokens(CompressConfig(method="cvxq", target_bits=3, cvxq_solver="claq", claq_share=1), 16 * 512)
    assert "CLAQ" in capsys.readouterr().err
    for cfg, tokens in ((CompressConfig(method="claq", bits=3), 128 * 512), (CompressConfig(method="gptq"), 512)):
        warn_few_tokens(cfg, tokens)
        assert capsys.readouterr().err == ""
