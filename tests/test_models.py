"""Models and artifacts that cannot be loaded completely are errors, never random weights; saving
never deletes what rdquant did not make and leaves nothing behind when the disk fails."""

from __future__ import annotations

import errno
import json
import shutil

import pytest
import torch

import rdquant
from rdquant.errors import RdquantError
from rdquant.models import load_model


def test_config_without_weights_is_refused(tiny_model_dir, tmp_path):
    d = tmp_path / "noweights"
    shutil.copytree(tiny_model_dir, d)
    (d / "model.safetensors").unlink()
    with pytest.raises(RdquantError, match="has a config.json but no weight files"):
        load_model(d)


def test_weights_that_do_not_match_the_config_are_refused(tiny_model_dir, tmp_path):
    from safetensors.torch import save_file

    d = tmp_path / "wrong"
    shutil.copytree(tiny_model_dir, d)
    save_file({"model.embed_tokens.weight": torch.zeros(4, 4)}, d / "model.safetensors")
    with pytest.raises(RdquantError, match="shapes do not match its config.json"):
        load_model(d)
    save_file({"model.layers.0.self_attn.q_proj.qweight": torch.zeros(4, dtype=torch.uint8)}, d / "model.safetensors")
    with pytest.raises(RdquantError, match="not a complete model.*half-written rdquant artifact"):
        load_model(d)
    with pytest.raises(RdquantError, match="not a complete model"):
        rdquant.evaluate(str(d), data="wikitext2", max_windows=1)


def test_unsupported_architecture_and_corrupt_config_are_one_line_errors(tiny_model_dir, tmp_path, capfd):
    d = tmp_path / "alien"
    shutil.copytree(tiny_model_dir, d)
    cfg = json.loads((d / "config.json").read_text())

    def refused(config: bytes, match: str) -> None:
        (d / "config.json").write_bytes(config)
        for load in (load_model, rdquant.load, rdquant.load_original):
            with pytest.raises(RdquantError, match=match) as e:
                load(d)
            assert "\n" not in str(e.value)

    refused(json.dumps({**cfg, "model_type": "alien-transformer"}).encode(), "model_type 'alien-transformer' is unknown")
    refused(json.dumps({**cfg, "model_type": "t5"}).encode(), "model_type 't5' is not a causal")
    refused(json.dumps({k: v for k, v in cfg.items() if k != "model_type"}).encode(), "names no model_type")
    refused(b"\xff\xfe{not json", "config.json is not valid JSON")
    refused(b"[1, 2]", "config.json is not a JSON object")
    assert "Traceback" not in capfd.readouterr().err


def test_damaged_tokenizer_of_a_model_directory_is_a_named_error(tiny_model_dir, tmp_path):
    d = tmp_path / "badtok"
    shutil.copytree(tiny_model_dir, d)
    (d / "tokenizer.json").write_bytes(b"garbage")
    for load in (load_model, rdquant.load_tokenizer):
        with pytest.raises(RdquantError, match="could not load the tokenizer of"):
            load(d)


def test_incomplete_weights_give_one_line_not_a_transformers_report(tiny_model_dir, tmp_path):
    import logging

    from safetensors.torch import load_file, save_file

    d = tmp_path / "partial"
    shutil.copytree(tiny_model_dir, d)
    weights = load_file(d / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, d / "model.safetensors", metadata={"format": "pt"})
    logged: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    log = logging.getLogger("transformers.modeling_utils")  # where transformers logs its loading report
    log.addHandler(handler)
    try:
        with pytest.raises(RdquantError, match=r"not a complete model: 1 tensors .*model\.norm\.weight"):
            load_model(d)
    finally:
        log.removeHandler(handler)
    assert not [m for m in logged if "LOAD REPORT" in m]  # rdquant's one line only, not a table before it


def test_load_takes_originals_as_well_as_artifacts(tiny_model_dir):
    m = rdquant.load(str(tiny_model_dir))
    assert isinstance(m, torch.nn.Module) and not any(type(x).__name__ == "QuantLinear" for x in m.modules())
    assert rdquant.load_original(str(tiny_model_dir)).state_dict().keys() == m.state_dict().keys()
    assert rdquant.load_tokenizer(str(tiny_model_dir))("hello")["input_ids"]


def _compressed(tiny_model_dir):
    cfg = rdquant.CompressConfig(bits=4, group_size=32, calib_samples=2, calib_seqlen=16)
    return rdquant.compress(str(tiny_model_dir), cfg, progress=False)


def test_save_never_replaces_a_directory_rdquant_did_not_make(tiny_model_dir, tmp_path):
    cm = _compressed(tiny_model_dir)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(RdquantError, match="not an rdquant artifact"):
        cm.save(mine, overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    cm.save(empty)  # an empty directory holds nothing to lose
    cm.save(empty, overwrite=True)  # our own artifact: replaced
    assert rdquant.inspect(empty).verified


def test_disk_errors_while_saving_are_named_and_leave_nothing(tiny_model_dir, tmp_path, monkeypatch):
    cm = _compressed(tiny_model_dir)
    import rdquant.artifact as artifact

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(artifact, "save_file", full)
    with pytest.raises(RdquantError, match="disk filled up .* needs about"):
        cm.save(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    Usage = shutil._ntuple_diskusage if hasattr(shutil, "_ntuple_diskusage") else None
    if Usage is not None:
        monkeypatch.setattr(artifact.shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 1000, 1000))
        with pytest.raises(RdquantError, match="not enough disk space .* MiB free"):
            cm.save(tmp_path / "out")
        assert list(tmp_path.iterdir()) == []


def test_read_only_output_is_refused_before_work(tiny_model_dir, tmp_path):
    import os

    if os.geteuid() == 0:
        from rdquant.safety import check_output

        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        # root may write anywhere: the access check passes, which is what the OS will do too
        check_output(ro / "art", overwrite=False)
        return
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    with pytest.raises(RdquantError, match="not writable"):
        _compressed(tiny_model_dir).save(ro / "art")
