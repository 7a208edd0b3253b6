"""Memory-limited inference: blocks beyond the budget are streamed from the artifact per forward, and the
model computes exactly what the fully loaded one does."""

from __future__ import annotations

import json
import time

import pytest
import torch

import rdquant
from rdquant.artifact import read_manifest
from rdquant.errors import ArtifactError, RdquantError
from rdquant.models import load_model
from rdquant.stream import Storage, make_plan, streamer_of

CONFIGS = {
    "gptq-coded": (dict(method="gptq", bits=3, group_size=48), "auto"),  # ragged groups (hidden 64)
    "gptq-packed-kv": (dict(method="gptq", bits=4, group_size=32, kv_bits=4), "none"),
    "claq": (dict(method="claq", bits=3, claq_outlier_frac=0.01), "auto"),
    "cvxq": (dict(method="cvxq", target_bits=3.0), "auto"),
    "slim-lowrank": (dict(method="slim", lowrank=0.25, lowrank_group=16), "none"),
}
PROMPT = (torch.arange(24).unsqueeze(0) * 7 % 300)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from rdquant.testing import save_tiny_model_dir

    return save_tiny_model_dir(tmp_path_factory.mktemp("stream") / "tiny", layers=6)


@pytest.fixture(scope="module", params=list(CONFIGS))
def artifact(request, tiny_dir, tmp_path_factory):
    kw, codec = CONFIGS[request.param]
    model, tok, mid = load_model(str(tiny_dir))
    cfg = rdquant.CompressConfig(calib_samples=8, calib_seqlen=64, batch_size=4, embed_bits=8, **kw)
    cm = rdquant.compress(model, cfg, tokenizer=tok, progress=False, model_id=mid)
    return cm.save(tmp_path_factory.mktemp(request.param) / "a", codec=codec)


def _tight(path) -> int:
    """A budget that keeps no block resident but reads one ahead."""
    plan = make_plan(read_manifest(path), None)
    return plan.fixed + 2 * max(plan.slots)


def test_streamed_outputs_are_those_of_the_full_load(artifact):
    full = rdquant.load(artifact)
    streamed = rdquant.load(artifact, max_memory=_tight(artifact))
    st = streamer_of(streamed)
    plan = streamed._rdquant_plan
    assert plan.streamed == list(range(6)) and plan.prefetch == 1 and plan.accounted <= plan.budget
    # the streamed blocks hold nothing until a forward needs them
    assert all(t.numel() == 0 for t in streamed.model.layers[0].buffers() if t.dtype == torch.uint8)
    with torch.inference_mode():
        ref = full(PROMPT).logits
        for _ in range(2):  # the second pass runs on blocks read ahead, cyclically
            assert torch.equal(streamed(PROMPT).logits, ref)
        gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(streamed.generate(PROMPT, **gen), full.generate(PROMPT, **gen))
    assert st.stats.peak_held <= plan.working
    assert st.stats.bytes_read >= 2 * sum(plan.blocks[b] for b in plan.streamed) * 0.3
    st.close()


def test_budget_keeps_the_leading_blocks_resident(artifact):
    plan = make_plan(read_manifest(artifact), None)
    assert not plan.streamed and plan.total == plan.fixed + sum(plan.blocks)
    budget = plan.fixed + 2 * max(plan.slots) + plan.blocks[0] + plan.blocks[1]
    m = rdquant.load(artifact, max_memory=budget)
    p = m._rdquant_plan
    assert p.resident == [0, 1] and p.streamed == [2, 3, 4, 5] and p.accounted <= budget
    assert rdquant.load(artifact, max_memory=plan.total)._rdquant_plan.streamed == []  # it all fits: no streaming
    # between a one-slot and a two-slot budget: no read-ahead
    assert make_plan(read_manifest(artifact), plan.minimum).prefetch == 0


def test_too_small_a_budget_names_the_smallest(artifact):
    plan = make_plan(read_manifest(artifact), None)
    with pytest.raises(RdquantError, match=r"below the smallest budget this model runs in, .* raise --max-memory"):
        rdquant.load(artifact, max_memory=plan.minimum - 1)


def test_bad_budgets_and_backends_are_refused(artifact, tiny_dir):
    for bad in ("lots", "-5MB", 0):
        with pytest.raises(RdquantError, match="max-memory|cannot read the size"):
            rdquant.load(artifact, max_memory=bad)
    with pytest.raises(RdquantError, match="second copy"):
        rdquant.load(artifact, max_memory="1GB", backend="cached")
    with pytest.raises(RdquantError, match="not one: compress it first"):
        rdquant.load(tiny_dir, max_memory="1GB")


def test_a_damaged_streamed_block_is_named_on_its_first_read(artifact, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(artifact, bad)
    manifest = read_manifest(bad)
    name = next(n for n in manifest["tensors"] if n.startswith("model.layers.5.") and n.endswith("qweight"))
    e = manifest["tensors"][name]
    f = bad / e["file"]
    header = json.loads(f.read_bytes()[8:8 + int.from_bytes(f.read_bytes()[:8], "little")])
    begin = 8 + int.from_bytes(f.read_bytes()[:8], "little") + header[name]["data_offsets"][0]
    data = bytearray(f.read_bytes())
    data[begin + 3] ^= 0xFF
    f.write_bytes(bytes(data))
    m = rdquant.load(bad, max_memory=_tight(bad))  # block 5 is not read at load
    for _ in range(2):  # and again: a failed read gives back what it held (no hang, no drift)
        with pytest.raises(ArtifactError, match="model.layers.5"), torch.inference_mode():
            m(PROMPT)
    assert streamer_of(m).stats.held == 0


def test_the_storage_throttle_holds_reads_to_its_bandwidth(artifact):
    bw = 4e6  # bytes/s
    m = rdquant.load(artifact, max_memory=_tight(artifact), storage=Storage(bandwidth=bw))
    st = streamer_of(m)
    t0 = time.perf_counter()
    with torch.inference_mode():
        m(PROMPT)
    assert st.stats.read_s >= st.stats.bytes_read / bw * 0.99
    assert time.perf_counter() - t0 >= st.stats.bytes_read / bw * 0.99
    with pytest.raises(RdquantError, match="bandwidth"):
        Storage(bandwidth=0)


def test_reference_backend_runs_a_large_layer_a_slice_of_rows_at_a_time(artifact, monkeypatch):
    """Above ROW_CHUNK weights the reference backend never dequantizes the whole layer, and the cached
    backend multiplies the same slices: the two agree bit for bit, prefill and decode."""
    from rdquant import runtime

    monkeypatch.setattr(runtime, "ROW_CHUNK", 1000)  # every layer of the tiny model is "large"
    cached, ref = rdquant.load(artifact, backend="cached"), rdquant.load(artifact, backend="reference")
    with torch.inference_mode():
        want = cached(PROMPT).logits
        for m in ref.modules():
            if isinstance(m, runtime.QuantLinear) and m.layout.name == "affine" and m.kind == "linear":
                monkeypatch.setattr(m.layout, "weight", lambda *a: pytest.fail("dequantized the whole layer"))
                break
        assert torch.equal(ref(PROMPT).logits, want)
        assert torch.equal(ref(PROMPT[:, :1]).logits, cached(PROMPT[:, :1]).logits)


def test_cli_generate_eval_and_inspect_under_a_budget(artifact, text_file):
    from typer.testing import CliRunner

    from rdquant.cli import app

    budget = f"{_tight(artifact)}"
    r = CliRunner().invoke(app, ["generate", str(artifact), "--max-memory", budget, "--max-new-tokens", "4"])
    assert r.exit_code == 0, r.output
    assert "--max-memory: 0 of 6 blocks resident, 6 streamed" in r.output and "block reads" in r.output
    r = CliRunner().invoke(app, ["eval", str(artifact), "--data", str(text_file), "--seqlen", "64", "--max-windows",
                                 "2", "--max-memory", budget, "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "ppl" in r.output and "streamed" in r.output
    r = CliRunner().invoke(app, ["generate", str(artifact), "--max-memory", "1KB"])
    assert r.exit_code != 0 and "below the smallest budget" in r.output
    r = CliRunner().invoke(app, ["inspect", str(artifact), "--no-layers", "--no-decode-speed"])
    assert "runs in as little as --max-memory" in r.output
    plan = make_plan(read_manifest(artifact), None)
    r = CliRunner().invoke(app, ["inspect", str(artifact), "--json", "--no-decode-speed"])
    assert json.loads(r.output)["min_max_memory_bytes"] == plan.minimum


def test_evaluate_streams_a_path_and_refuses_a_budget_for_a_loaded_model(artifact, text_file):
    budget = _tight(artifact)
    streamed = rdquant.evaluate(str(artifact), data=str(text_file), seqlen=64, max_windows=2, progress=False,
                                max_memory=budget)
    full = rdquant.evaluate(str(artifact), data=str(text_file), seqlen=64, max_windows=2, progress=False)
    assert streamed.ppl == full.ppl
    with pytest.raises(RdquantError, match="max_memory applies when evaluate loads"):
        rdquant.evaluate(rdquant.load(artifact), tokenizer=None, max_memory=budget)
