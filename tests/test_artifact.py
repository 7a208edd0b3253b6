"""compress -> save -> load on tiny random models of two families; damage detection; size report."""

import json
import math
import shutil

import pytest
import torch

import rdquant
from rdquant.artifact import MANIFEST
from rdquant.models import find_blocks, load_model
from rdquant.runtime import QuantEmbedding, QuantLinear


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
    assert n_q == 7 * len(blocks)  # every block linear
    assert isinstance(cm.model.lm_head, QuantLinear) and cm.model.lm_head.kind == "head"  # 8-bit by default
    assert isinstance(cm.model.get_input_embeddings(), QuantEmbedding)
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
    cm, out, tok = _compress(d, tmp_path, method="rtn", bits=4, group_size=32, embed_bits=16)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    loaded = rdquant.load(out)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # one tensor, as in the original
    x = tok("tied weights", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(cm.model(x).logits, loaded(x).logits)


@pytest.mark.parametrize("tie", [True, False])
def test_quantized_embedding_and_head(tmp_path, tie):
    """The vocabulary matrices: a tied pair is one quantized matrix stored once (the head reads the
    embedding's tensors), an untied head is GPTQ-solved; both load back, and the embedding looks up
    only the rows asked for (equal to dequantizing the whole matrix and indexing it)."""
    from rdquant.testing import save_tiny_model_dir

    d = save_tiny_model_dir(tmp_path / "m", "llama", tie_word_embeddings=tie)
    cm, out, tok = _compress(d, tmp_path, bits=4, group_size=32, embed_bits=6)
    manifest = json.loads((out / MANIFEST).read_text())
    emb = manifest["quantized"]["model.embed_tokens"]
    assert emb["kind"] == "embedding" and emb["bits"] == 6 and emb["symmetric"]
    if tie:
        assert emb["tied_head"] == "lm_head" and "lm_head" not in manifest["quantized"]
        assert set(manifest["tied"]) == {"lm_head.qweight", "lm_head.scales"}
    else:
        assert manifest["quantized"]["lm_head"]["kind"] == "head" and manifest["quantized"]["lm_head"]["method"] == "gptq"
    loaded = rdquant.load(out)
    if tie:
        assert loaded.lm_head.qweight is loaded.model.embed_tokens.qweight
    x = tok("the vocabulary in the budget", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(cm.model(x).logits, loaded(x).logits)
        e = loaded.model.embed_tokens
        assert torch.equal(e(x), e.dequantized_weight()[x])
    rep = rdquant.inspect(out)
    assert rep.vocab_params == (1 if tie else 2) * 400 * 64
    assert rep.quantized_params == sum(l.params for l in rep.layers if l.kind == "linear")
    dense = _compress(d, tmp_path / "dense", bits=4, group_size=32, embed_bits=16)[1]
    assert rdquant.inspect(dense).vocab_params == 0
    assert rdquant.inspect(dense).total_bytes > rep.total_bytes


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
        if manifest["quantized"].get(name.rpartition(".")[0], {"kind": "dense"}).get("kind", "linear") == "linear"
    )
    assert rep.quantized_bytes == quant_bytes  # the decoder linears (the vocabulary matrices apart)
    vocab = [n for n, i in manifest["quantized"].items() if i.get("kind") in ("embedding", "head")]
    assert rep.vocab_params == sum(math.prod(manifest["quantized"][n]["shape"]) for n in vocab) > 0
    # 3-bit codes + (16-bit scale + 3-bit zero) per group of 64 (ragged groups cost more)
    assert 3 + 19 / 64 <= rep.bits_per_weight < 3 + 19 / 32 + 0.2
    assert rep.total_bytes == sum(f.stat().st_size for f in out.iterdir())
    assert rep.compression_ratio > 1
    # the whole-file figure counts every parameter (16-bit embeddings and norms too) and every byte
    n_params = sum(p.numel() for p in cm.model.parameters()) + sum(
        math.prod(i["shape"]) for i in manifest["quantized"].values())  # quantized weights are buffers
    assert rep.file_bits_per_param == pytest.approx(8 * rep.total_bytes / n_params, rel=1e-9)
    assert rep.file_bits_per_param > rep.bits_per_weight  # 8-bit embeddings, 16-bit norms, the files' overhead
    tensors = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert rep.tensor_bits_per_param == pytest.approx(8 * tensors / n_params, rel=1e-9)
    assert rep.tensor_bits_per_param < rep.file_bits_per_param  # no tokenizer, manifest or config


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
    with pytest.raises(rdquant.ArtifactError, match="manifest.json fails its sha256 check"):
        rdquant.load(broken)
    del manifest["manifest_sha256"]  # as written before manifests had their own checksum
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


def test_failed_replace_puts_the_previous_artifact_back(tiny_model_dir, tmp_path, monkeypatch):
    import errno
    import os
    from pathlib import Path

    cm, out, _ = _compress(tiny_model_dir, tmp_path)
    before = (out / MANIFEST).read_bytes()
    rename = Path.rename

    def failing(self, target):  # the new artifact cannot be moved into place (e.g. a full directory table)
        if ".tmp-" in self.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(rdquant.RdquantError, match="nothing was kept"):
        cm.save(out, overwrite=True)
    monkeypatch.undo()
    assert (out / MANIFEST).read_bytes() == before  # the previous artifact is where it was, whole
    rdquant.load(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    # an old artifact left by a killed run of this process id is ours to clear; a user's directory there is not
    stale = tmp_path / f".art.old-{os.getpid()}"
    shutil.copytree(out, stale)
    cm.save(out, overwrite=True)
    assert not stale.exists()
    stale.mkdir()
    (stale / "notes.txt").write_text("keep me")
    with pytest.raises(rdquant.RdquantError, match="will not delete"):
        cm.save(out, overwrite=True)
    assert (stale / "notes.txt").read_text() == "keep me" and (out / MANIFEST).is_file()
    assert not list(tmp_path.glob(".art.tmp-*"))


def test_a_changed_value_in_the_manifest_fails_its_checksum(tiny_model_dir, tmp_path):
    _, out, tok = _compress(tiny_model_dir, tmp_path, bits=4, group_size=16)
    x = tok("a flipped digit", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = rdquant.load(out)(x).logits
    text = (out / MANIFEST).read_text()
    manifest = json.loads(text)
    assert manifest["manifest_sha256"]
    layer = next(n for n, q in manifest["quantized"].items() if q["shape"][1] % 32 == 0)
    # one flipped bit ('6' -> '7'): the same number of groups, so every tensor still fits, but each
    # group's scale now covers other columns
    i = text.index('"group_size": 16', text.index(f'"{layer}": {{', text.index('"quantized"'))) + len('"group_size": 1')
    damaged = text[:i] + "7" + text[i + 1:]
    (out / MANIFEST).write_text(damaged)
    with pytest.raises(rdquant.ArtifactError, match="manifest.json fails its sha256 check"):
        rdquant.load(out)
    with pytest.raises(rdquant.ArtifactError, match="manifest.json fails its sha256 check"):
        rdquant.inspect(out, verify=False)
    legacy = json.loads(damaged)
    del legacy["manifest_sha256"]  # without the checksum (older artifacts) nothing else can tell
    (out / MANIFEST).write_text(json.dumps(legacy))
    with torch.no_grad():
        assert not torch.equal(rdquant.load(out)(x).logits, expected)


def _without_checksum(manifest: dict) -> dict:
    """A manifest as older rdquant wrote it (no manifest_sha256): its structure is all a reader can check."""
    return {k: v for k, v in manifest.items() if k != "manifest_sha256"}


def test_manifest_values_of_the_wrong_type_are_artifact_errors(tiny_model_dir, tmp_path):
    _, out, _ = _compress(tiny_model_dir, tmp_path)
    good = _without_checksum(json.loads((out / MANIFEST).read_text()))
    layer = next(iter(good["quantized"]))
    qweight = f"{layer}.qweight"

    def damaged(edit) -> None:
        m = json.loads(json.dumps(good))
        edit(m)
        (out / MANIFEST).write_text(json.dumps(m))
        for call in (rdquant.load, lambda p: rdquant.inspect(p, verify=False).table(), rdquant.load_tokenizer):
            with pytest.raises(rdquant.ArtifactError, match="manifest.json is damaged"):
                call(out)

    damaged(lambda m: m["tensors"][qweight].update(file=["model.safetensors"]))  # unhashable: was a TypeError
    m = json.loads(json.dumps(good))
    del m["tensors"][qweight]  # a quantized layer without codes: was inspect's KeyError
    (out / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(rdquant.ArtifactError, match=f"has no tensor {qweight}"):
        rdquant.inspect(out, verify=False)
    with pytest.raises(rdquant.ArtifactError, match=f"{qweight} is missing"):
        rdquant.load(out)
    damaged(lambda m: m["quantized"][layer].update(method=[]))  # inspect's table: a TypeError
    damaged(lambda m: m["quantized"][layer].update(mean_width="x"))
    damaged(lambda m: m["tensors"][qweight].update(codec={"codec": "zstd-3", "kind": "bytes", "entropy_bits": "x"},
                                                   stored_bytes=1, stored_sha256="0"))
    (out / MANIFEST).write_text(json.dumps({k: v for k, v in good.items() if k != "quantized"}))
    rep = rdquant.inspect(out, verify=False)  # 'quantized' is optional: nothing quantized, all dense
    assert rep.layers == [] and rep.dense_params > 0
    with pytest.raises(rdquant.ArtifactError):  # yet its qweights do not belong to a plain model
        rdquant.load(out)


def test_vocab_matrices_are_solved_in_row_chunks(monkeypatch):
    """The head's GPTQ and the embedding's rounding run a chunk of rows at a time (an 8B head is 2 GiB in
    float32): the result equals the whole matrix's, and the log covers every row."""
    from rdquant import vocab

    g = torch.Generator().manual_seed(0)
    W = torch.randn(300, 96, generator=g)
    X = torch.randn(400, 96, generator=g)
    H = 2 * X.t() @ X / 400
    vcfg = vocab.vocab_config(rdquant.CompressConfig(group_size=32, embed_bits=4))
    out = {}
    for chunk in (1 << 30, 40 * 96 * 4):  # one chunk; chunks of 40 rows (the last one ragged)
        monkeypatch.setattr(vocab, "CHUNK_BYTES", chunk)
        out[chunk] = [vocab._quantize_rows("lm_head", W, h, vcfg, torch.device("cpu")) for h in (H, None)]
    for (qa, la), (qb, lb) in zip(*out.values()):
        assert (qa.codes == qb.codes).float().mean() > 0.999 and torch.equal(qa.scales, qb.scales)
        assert lb.shape == (300, 96) and abs(la.weight_mse - lb.weight_mse) <= 1e-3 * la.weight_mse
        if la.proxy_error is not None:
            assert abs(la.proxy_error - lb.proxy_error) <= 1e-3 * la.proxy_error
            assert lb.proxy_error < lb.proxy_error_rtn
