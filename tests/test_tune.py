"""Distillation tuning: lowers the held-out KL to the original, changes no code and no byte count,
and the saved artifact reloads to exactly the tuned model."""

import copy

import pytest
import torch

import rdquant
from rdquant import CompressConfig
from rdquant.errors import RdquantError
from rdquant.data import calibration_windows
from rdquant.models import load_model
from rdquant.runtime import QuantLinear
from rdquant.tune import tune


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from rdquant.testing import save_tiny_model_dir

    return save_tiny_model_dir(tmp_path_factory.mktemp("tune-llama"), "llama")


@pytest.mark.parametrize("extra", [dict(method="claq", bits=2, claq_outlier_frac=0.01),
                                   dict(method="claq", bits=2, claq_codebook_bits=16, claq_row_scale=False),
                                   dict(method="gptq", bits=2, group_size=32)])
def test_tuning_lowers_kl_keeps_codes_and_size_and_reloads_exactly(llama_dir, tmp_path, extra):
    base = CompressConfig(calib_samples=16, calib_seqlen=48, batch_size=8, **extra)
    model, tok, mid = load_model(str(llama_dir))
    plain = rdquant.compress(model, base, tokenizer=tok, progress=False, model_id=mid)
    assert plain.tuning is None
    # codes untouched: tune a copy of this very model (two separate compressions need not agree to
    # the last bit: BLAS sums may depend on memory alignment, and one flipped code moves the rest)
    student = copy.deepcopy(plain.model)
    teacher, _, _ = load_model(str(llama_dir))
    calib = calibration_windows(tok, base.calib, base.calib_samples, base.calib_seqlen, base.seed)
    log = tune(student, teacher.float(), calib, 25, lr=5e-3, batch=4, progress=False)
    assert log.tuned_layers > 0 and log.kl_after < log.kl_before, log
    changed = 0
    for (n, a), (_, b) in zip(plain.model.named_modules(), student.named_modules()):
        if isinstance(a, QuantLinear):
            assert torch.equal(a.qweight, b.qweight), n
            for k in ("outlier_val", "outlier_row", "qzeros", "widths", "qwidths"):
                if getattr(a, k, None) is not None:
                    assert torch.equal(getattr(a, k), getattr(b, k)), (n, k)
            changed += not torch.equal(a.dequantized_weight(), b.dequantized_weight())
    assert changed > 0
    # the config path: compress(tune_steps=...) tunes, records it, and saves what reloads exactly
    model, tok, mid = load_model(str(llama_dir))
    tuned = rdquant.compress(model, base.replace(tune_steps=25, tune_lr=5e-3, tune_batch=4), tokenizer=tok,
                             progress=False, model_id=mid)
    log = tuned.tuning
    assert log["steps"] == 25 and log["tuned_layers"] > 0
    assert log["kl_after"] < log["kl_before"], log  # held-out windows, values as stored
    pa, pb = plain.save(tmp_path / "plain"), tuned.save(tmp_path / "tuned")
    assert rdquant.inspect(pa).quantized_bytes == rdquant.inspect(pb).quantized_bytes
    x = torch.arange(1, 40).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(rdquant.load(pb)(x).logits, tuned.model(x).logits)
    from rdquant.artifact import read_manifest

    assert read_manifest(pb)["tuning"]["steps"] == 25


def test_tuning_settings_are_checked():
    with pytest.raises(RdquantError, match="tune"):
        CompressConfig(tune_steps=-1)
    with pytest.raises(RdquantError, match="tune"):
        CompressConfig(tune_lr=0)


@pytest.mark.parametrize("reuse", [True, False])
def test_block_tuning_lowers_every_blocks_error_and_streams(llama_dir, tmp_path, reuse):
    """--tune-scope block: each block's output error against the float block (same inputs) falls; the
    streamed pipeline (one block in memory) gives the same model as the in-memory one; the artifact
    reloads to it."""
    from rdquant.source import LazyBlocks

    cfg = CompressConfig(method="gptq", bits=2, group_size=32, calib_samples=16, calib_seqlen=48, batch_size=4,
                         tune_steps=20, tune_lr=5e-3, tune_scope="block", reuse_activations=reuse, embed_bits=16)
    model, tok, mid = load_model(str(llama_dir))
    cm = rdquant.compress(model, cfg, tokenizer=tok, progress=False, model_id=mid)
    t = cm.tuning
    assert t["scope"] == "block" and t["blocks"] == len(t["error_before"]) > 0 and t["tuned_layers"] > 0
    assert all(a < b for a, b in zip(t["error_after"], t["error_before"])), t
    plain = rdquant.compress(load_model(str(llama_dir))[0], cfg.replace(tune_steps=0), tokenizer=tok, progress=False)
    assert plain.tuning is None
    moved = [k for k, v in cm.model.state_dict().items() if not torch.equal(v, plain.model.state_dict()[k])]
    first = [k for k in moved if k.startswith("model.layers.0.")]  # later blocks see tuned inputs: their codes differ
    assert first and all(k.endswith(".scales") for k in first), first  # block 0: codes stay, scales move
    streamed = rdquant.compress(LazyBlocks(llama_dir), cfg, tokenizer=tok, progress=False, model_id=mid,
                                checkpoint_dir=tmp_path / "ck")
    assert streamed.tuning["blocks"] == t["blocks"]
    out = cm.save(tmp_path / "a")
    x = torch.arange(30).unsqueeze(0) % 200
    with torch.no_grad():
        assert torch.equal(rdquant.load(out)(x).logits, cm.model(x).logits)


def test_block_tuning_needs_a_calibrated_method():
    with pytest.raises(RdquantError, match="tune-scope block"):
        CompressConfig(method="rtn", tune_steps=5, tune_scope="block")


def test_tune_scope_without_steps_names_the_missing_flag():
    import rdquant.config

    with pytest.raises(RdquantError, match="tune_scope is not used by method gptq without --tune-steps"):
        rdquant.config.from_settings({}, {"method": "gptq", "tune_scope": "block"})
