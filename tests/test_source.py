"""Block sources: a streamed run (one block in memory, blocks written as they finish) writes the same
artifact as an in-memory run, resumes, and a synthetic source is deterministic."""

import json

import pytest
import torch

import rdquant
from rdquant import artifact, pipeline
from rdquant.models import load_model
from rdquant.source import LazyBlocks, SyntheticBlocks
from rdquant.testing import save_tiny_model_dir
from test_pipeline import _cfg, _tensors  # the same small runs as the pipeline tests


def _same(a, b):
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert ma["quantized"] == mb["quantized"] and ma["tied"] == mb["tied"]


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tied"), "llama", tie_word_embeddings=True)


@pytest.mark.parametrize("method", ["gptq", "claq"])
def test_streamed_run_writes_the_in_memory_artifact(tiny_model_dir, tmp_path, method):
    cfg = _cfg(method=method, bits=3)
    model, tok, mid = load_model(str(tiny_model_dir))
    a = rdquant.compress(model, cfg, tokenizer=tok, progress=False, model_id=mid).save(tmp_path / "memory")
    src = LazyBlocks(tiny_model_dir)
    cm = rdquant.compress(src, cfg, tokenizer=tok, progress=False, model_id=mid, checkpoint_dir=tmp_path / "ck")
    assert cm.streamed and all(p.is_meta for p in src.blocks[1].parameters())  # no block left in memory
    b = cm.save(tmp_path / "streamed")
    _same(a, b)
    out = rdquant.load(b)
    ids = torch.randint(0, 300, (1, 12))
    ref = rdquant.load(a)
    assert torch.equal(out(ids).logits, ref(ids).logits)


def test_streamed_tied_model(tied_dir, tmp_path):
    cfg = _cfg(bits=4)
    model, tok, mid = load_model(str(tied_dir))
    a = rdquant.compress(model, cfg, tokenizer=tok, progress=False, model_id=mid).save(tmp_path / "memory")
    b = rdquant.compress(LazyBlocks(tied_dir), cfg, tokenizer=tok, progress=False, model_id=mid,
                         checkpoint_dir=tmp_path / "ck").save(tmp_path / "streamed")
    _same(a, b)
    assert json.loads((b / "manifest.json").read_text())["tied"]  # the head is stored once


def test_streamed_resume_recomputes_from_the_last_saved_inputs(tiny_model_dir, tmp_path, monkeypatch):
    """Inputs are checkpointed only now and then for big runs: a resume recomputes the blocks since."""
    cfg = _cfg(bits=3)
    model, tok, mid = load_model(str(tiny_model_dir))
    full = rdquant.compress(model, cfg, tokenizer=tok, progress=False, model_id=mid).save(tmp_path / "full")
    monkeypatch.setattr(pipeline, "SMALL_INPUTS", 0)
    monkeypatch.setattr(pipeline, "INPUTS_EVERY_S", 1e9)  # never saved: resume recomputes from block 0

    def stop(i):
        if i == 1:
            raise KeyboardInterrupt

    ck = tmp_path / "ck"
    with pytest.raises(KeyboardInterrupt):
        rdquant.compress(LazyBlocks(tiny_model_dir), cfg, tokenizer=tok, progress=False, model_id=mid,
                         checkpoint_dir=ck, after_block=stop)
    assert not (ck / "inputs.safetensors").exists()
    resumed = rdquant.compress(LazyBlocks(tiny_model_dir), cfg, tokenizer=tok, progress=False, model_id=mid,
                               checkpoint_dir=ck, resume=True).save(tmp_path / "resumed")
    _same(full, resumed)


def test_streamed_source_needs_a_checkpoint_directory(tiny_model_dir):
    model, tok, mid = load_model(str(tiny_model_dir))
    with pytest.raises(rdquant.RdquantError, match="checkpoint_dir"):
        rdquant.compress(LazyBlocks(tiny_model_dir), _cfg(), tokenizer=tok, progress=False)


def test_reuse_budget_changes_nothing(tiny_model_dir, tmp_path, monkeypatch):
    """With no memory for reused activations everything is recomputed, with identical results."""
    model, tok, mid = load_model(str(tiny_model_dir))
    a = rdquant.compress(model, _cfg(bits=3), tokenizer=tok, progress=False, model_id=mid).save(tmp_path / "a")
    original = pipeline.ActivationReuse.__init__

    def no_budget(self, block, tails=None, budget=float("inf")):
        original(self, block, tails, 0)

    monkeypatch.setattr(pipeline.ActivationReuse, "__init__", no_budget)
    model, tok, mid = load_model(str(tiny_model_dir))
    b = rdquant.compress(model, _cfg(bits=3), tokenizer=tok, progress=False, model_id=mid).save(tmp_path / "b")
    _same(a, b)


def test_artifact_shards_are_written_one_at_a_time(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(artifact, "SHARD_BYTES", 20_000)
    model, tok, mid = load_model(str(tiny_model_dir))
    out = rdquant.compress(LazyBlocks(tiny_model_dir), _cfg(), tokenizer=tok, progress=False, model_id=mid,
                           checkpoint_dir=tmp_path / "ck").save(tmp_path / "a")
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 3
    assert rdquant.inspect(out).total_bytes > 0  # every tensor verified against its sha256


def test_synthetic_blocks_are_deterministic(tiny_model_dir):
    model, _, _ = load_model(str(tiny_model_dir))
    a, b = SyntheticBlocks(model.config, torch.float32, seed=3), SyntheticBlocks(model.config, torch.float32, seed=3)
    w0 = a.load(0, "cpu").state_dict()
    assert all(torch.equal(v, b.load(0, "cpu").state_dict()[k]) for k, v in w0.items())
    w1 = a.load(1, "cpu").state_dict()
    assert not torch.equal(w0["mlp.up_proj.weight"], w1["mlp.up_proj.weight"])
    a.release(0)
    assert a.blocks[1][0].mlp.up_proj.weight.is_meta
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        for i in range(len(b)):
            b.load(i, "cpu")
        assert torch.isfinite(b.model(ids).logits).all()


def test_lazy_source_names_a_missing_tensor(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "broken"
    d.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            (d / f.name).write_bytes(f.read_bytes())
    t = load_file(tiny_model_dir / "model.safetensors")
    del t["model.layers.1.mlp.up_proj.weight"]
    save_file(t, d / "model.safetensors")
    with pytest.raises(rdquant.RdquantError, match="model.layers.1.mlp.up_proj.weight"):
        LazyBlocks(d)  # from the names alone, before calibration
    from rdquant.cli import streamed_source

    assert streamed_source(str(d), rdquant.CompressConfig()) is None  # the CLI loads such a model in memory


@pytest.mark.parametrize("objective,keep_all", [("gradient", True), ("fisher", True), ("gradient", False)])
def test_blockwise_sensitivity_equals_the_whole_model_backward(tiny_model_dir, objective, keep_all, monkeypatch):
    """The streamed sensitivity pass (one block at a time, in reverse) gives the whole-model gradients,
    also when it keeps only every k-th block input and recomputes the rest (a deep model's memory)."""
    from rdquant import sensitivity

    if not keep_all:
        monkeypatch.setattr(sensitivity, "KEEP_BYTES", 0)
    from rdquant.methods.cvxq import model_layers
    from rdquant.sensitivity import blockwise_gradient_sensitivity, gradient_sensitivity

    model, tok, mid = load_model(str(tiny_model_dir))
    ids = torch.randint(0, 300, (6, 32), generator=torch.Generator().manual_seed(0))
    cfg = _cfg(method="cvxq", target_bits=3.0)
    names = [l.name for l in model_layers(model, cfg)]
    pca = "pca" if objective == "gradient" else "fisher"
    from rdquant.vocab import VocabSensitivity

    whole = VocabSensitivity(model, cfg)
    ref = gradient_sensitivity(model, ids, names, 16, 4, 2, "cpu", 0, False, pca, vocab=whole)
    got = {}
    source = LazyBlocks(tiny_model_dir)
    streamed = VocabSensitivity(source.model, cfg)
    blockwise_gradient_sensitivity(source, ids, cfg.skip, 16, 4, 2, "cpu", 0, False, pca,
                                   on_block=lambda i, b, s: got.update({k: v.clone() for k, v in s.items()}),
                                   vocab=streamed)
    assert got.keys() == ref.keys()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-3, atol=1e-9 * float(ref[n].abs().max()))
    # the embedding's and head's distortion weights (cells of the allocation) agree too
    for k in ("emb_sum", "head_sum", "gz_sum", "emb_steps", "head_steps", "positions"):
        assert getattr(streamed, k) == pytest.approx(getattr(whole, k), rel=1e-3) and getattr(whole, k) > 0, k


def test_streamed_cvxq_plans_the_in_memory_widths(tiny_model_dir, tmp_path):
    cfg = _cfg(method="cvxq", target_bits=3.0)
    model, tok, mid = load_model(str(tiny_model_dir))
    a = rdquant.compress(model, cfg, tokenizer=tok, progress=False, model_id=mid)
    b = rdquant.compress(LazyBlocks(tiny_model_dir), cfg, tokenizer=tok, progress=False, model_id=mid,
                         checkpoint_dir=tmp_path / "ck")
    assert abs(a.method_state.planned_bits - b.method_state.planned_bits) < 1e-3
    agree = [float((a.method_state.widths[n] == b.method_state.widths[n]).float().mean()) for n in a.method_state.widths]
    assert min(agree) > 0.98  # near-ties of float rounding may move a cell
    b.save(tmp_path / "streamed")
    assert rdquant.inspect(tmp_path / "streamed").total_bytes > 0


def test_a_run_that_cannot_fit_is_refused_before_work(monkeypatch):
    """The memory plan: activations go to pinned CPU memory when the GPU is short, and a run that fits
    nowhere is refused with the flag that fixes it (GPU paths with a faked mem_get_info)."""
    from types import SimpleNamespace

    import psutil

    cfg = rdquant.CompressConfig(device="cuda", batch_size=16)
    gib = 2**30
    args = (128, 2048, 4096, torch.bfloat16)  # 128 x 2048 windows of a 4096-wide bf16 model: 2 GiB per copy
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (40 * gib, 80 * gib))
    assert pipeline.activation_home(cfg, *args, 8 * gib).type == "cuda"
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (10 * gib, 80 * gib))
    assert pipeline.activation_home(cfg, *args, 8 * gib).type == "cpu"  # 8 + 4 GiB > 90% of 10
    with pytest.raises(rdquant.RdquantError, match="--activations auto"):
        pipeline.activation_home(rdquant.CompressConfig(device="cuda", activations="device"), *args, 8 * gib)
    with pytest.raises(rdquant.RdquantError, match="lower --batch-size"):
        pipeline.activation_home(cfg, *args, 12 * gib)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=3 * gib))
    with pytest.raises(rdquant.RdquantError, match="lower --calib-samples"):
        pipeline.activation_home(cfg, *args, 8 * gib)
