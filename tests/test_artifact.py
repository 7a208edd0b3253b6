"""compress -> save -> load on tiny random models of two families; damage detection; size report."""

import json
import shutil

import pytest
import torch

import rdquant
from rdquant.artifact import MANIFEST
from rdquant.models import find_blocks, load_model
from rdquant.runtime import QuantLinear


def _compress(model_dir, tmp_path, **cfg):
    model, tok, mid = load_model(str(model_dir))
    config = rdquant.CompressConfig(calib_samples=8, calib_seqlen=64, batch_size=4, **cfg)
    cm = rdquant.compress(model, config, tokenizer=tok, progress=False, model_id=mid)
    out = cm.save(tmp_path / "art")
    return cm, out, tok


@pytest.mark.parametrize("method,bits,group", [("gptq", 4, 64), ("gptq", 3, 48), ("rtn", 2, -1), ("gptq", 8, 32)])
def test_save_load_identical_outputs(tiny_model_dir, tmp_path, method, bits, group):
    cm, out, tok = _compress(tiny_model_dir, tmp_path, method=method, bits=bits, group_size=group)
    _, blocks = find_blocks(cm.model)
    n_q = sum(isinstance(m, QuantLinear) for m in blocks.modules())
    assert n_q == 7 * len(blocks)  # every block linear, nothing else
    assert isinstance(cm.model.lm_head, torch.nn.Linear)
    loaded = rdquant.load(out)
    x = tok("hello world, this is a test of the artifact", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = cm.model(x).logits, loaded(x).logits
    assert torch.equal(a, b)
    for name, m in cm.model.named_modules():
        if isinstance(m, QuantLinear):
            assert torch.equal(m.dequantized_weight(), loaded.get_submodule(name).dequantized_weight())


def test_tied_embeddings_are_stored_once_and_tied_again_on_load(tmp_path):
    from rdquant.testing import save_tiny_model_dir

    d = save_tiny_model_dir(tmp_path / "tied", "llama", tie_word_embeddings=True)
    cm, out, tok = _compress(d, tmp_path, method="rtn", bits=4, group_size=32)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    loaded = rdquant.load(out)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # one tensor, as in the original
    x = tok("tied weights", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(cm.model(x).logits, loaded(x).logits)


def test_generate_from_artifact(tiny_model_dir, tmp_path):
    _, out, tok = _compress(tiny_model_dir, tmp_path)
    model = rdquant.load(out, cache_dequantized=True)
    enc = tok("the", return_tensors="pt")
    gen = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.eos_token_id)
    assert gen.shape[1] == enc["input_ids"].shape[1] + 5


def test_inspect_counts_every_byte(tiny_model_dir, tmp_path):
    cm, out, _ = _compress(tiny_model_dir, tmp_path, bits=3, group_size=64)
    rep = rdquant.inspect(out)
    manifest = json.loads((out / MANIFEST).read_text())
    quant_bytes = sum(
        torch.tensor(info["shape"]).prod().item() * (1 if info["dtype"] == "uint8" else 2)
        for name, info in manifest["tensors"].items()
        if name.rpartition(".")[0] in manifest["quantized"]
    )
    assert rep.quantized_bytes == quant_bytes
    # 3-bit codes + (16-bit scale + 3-bit zero) per group of 64 (ragged groups cost more)
    assert 3 + 19 / 64 <= rep.bits_per_weight < 3 + 19 / 32 + 0.2
    assert rep.total_bytes == sum(f.stat().st_size for f in out.iterdir())
    assert rep.compression_ratio > 1


def _first_quant_tensor(out):
    manifest = json.loads((out / MANIFEST).read_text())
    name = next(n for n in manifest["tensors"] if n.endswith(".qweight"))
    return manifest, name


def test_bit_flip_is_detected_and_named(tiny_model_dir, tmp_path):
    _, out, _ = _compress(tiny_model_dir, tmp_path)
    manifest, name = _first_quant_tensor(out)
    f = out / "model.safetensors"
    data = bytearray(f.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    hdr = json.loads(data[8:header])
    off = header + hdr[name]["data_offsets"][0]
    data[off] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(rdquant.ArtifactError, match=name.replace(".", r"\.")):
        rdquant.load(out)


def test_truncation_is_detected_and_named(tiny_model_dir, tmp_path):
    _, out, _ = _compress(tiny_model_dir, tmp_path)
    f = out / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(rdquant.ArtifactError, match="truncated.*tensor "):
        rdquant.load(out)


def test_missing_manifest_and_tensor(tiny_model_dir, tmp_path):
    _, out, _ = _compress(tiny_model_dir, tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    manifest = json.loads((broken / MANIFEST).read_text())
    manifest["tensors"]["model.extra.weight"] = dict(next(iter(manifest["tensors"].values())))
    (broken / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(rdquant.ArtifactError, match="model.extra.weight"):
        rdquant.load(broken)
    (broken / MANIFEST).unlink()  # half-written: no manifest, weights that are not the config's
    with pytest.raises(rdquant.RdquantError, match="half-written rdquant artifact"):
        rdquant.load(broken)


def test_existing_output_needs_overwrite(tiny_model_dir, tmp_path):
    cm, out, _ = _compress(tiny_model_dir, tmp_path)
    with pytest.raises(rdquant.RdquantError, match="overwrite"):
        cm.save(out)
    cm.save(out, overwrite=True)
    assert not list(tmp_path.glob(".art.*"))  # no temporary directories left behind
