"""Distillation tuning: lowers the held-out KL to the original, changes no code and no byte count,
and the saved artifact reloads to exactly the tuned model."""

import pytest
import torch

import rdquant
from rdquant import CompressConfig
from rdquant.errors import RdquantError
from rdquant.models import load_model
from rdquant.runtime import QuantLinear


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from rdquant.testing import save_tiny_model_dir

    return save_tiny_model_dir(tmp_path_factory.mktemp("tune-llama"), "llama")


@pytest.mark.parametrize("extra", [dict(method="claq", bits=2, claq_outlier_frac=0.01),
                                   dict(method="claq", bits=2, claq_codebook_bits=16, claq_row_scale=False),
                                   dict(method="gptq", bits=2, group_size=32)])
def test_tuning_lowers_kl_keeps_codes_and_size_and_reloads_exactly(llama_dir, tmp_path, extra):
    base = CompressConfig(calib_samples=16, calib_seqlen=48, batch_size=8, **extra)
    runs = {}
    for steps in (0, 25):
        model, tok, mid = load_model(str(llama_dir))
        cfg = base.replace(tune_steps=steps, tune_lr=5e-3, tune_batch=4)
        runs[steps] = rdquant.compress(model, cfg, tokenizer=tok, progress=False, model_id=mid)
    plain, tuned = runs[0], runs[25]
    log = tuned.tuning
    assert plain.tuning is None and log["steps"] == 25 and log["tuned_layers"] > 0
    assert log["kl_after"] < log["kl_before"], log  # held-out windows, values as stored
    changed = 0
    for (n, a), (_, b) in zip(plain.model.named_modules(), tuned.model.named_modules()):
        if isinstance(a, QuantLinear):
            assert torch.equal(a.qweight, b.qweight), n  # codes untouched
            for k in ("outlier_val", "outlier_row", "qzeros"):
                if getattr(a, k, None) is not None:
                    assert torch.equal(getattr(a, k), getattr(b, k)), (n, k)
            changed += not torch.equal(a.dequantized_weight(), b.dequantized_weight())
    assert changed > 0
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
