"""One source of defaults, one validation step before any work, and the CLI's data-safety rules."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import typer
from typer.testing import CliRunner

import rdquant
from rdquant.cli import app
from rdquant.config import FIELDS, CompressConfig, flag_of, from_settings
from rdquant.errors import RdquantError

runner = CliRunner()


def _compress_params() -> dict:
    cmd = typer.main.get_command(app).commands["compress"]
    return {p.name: p for p in cmd.params}


def _error(args: list[str]) -> str:
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    errors = [l for l in r.output.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in r.output, r.output
    return errors[0]


def test_every_config_flag_has_the_configs_default_and_shows_it():
    params = _compress_params()
    shown = 0
    for name, f in FIELDS.items():
        if not f.metadata["cli"]:
            assert name not in params or params[name].hidden
            continue
        p = params[name]
        default = p.default if f.metadata["unit"] != "size" else p.default
        assert default == f.default or (isinstance(f.default, tuple) and list(default) == list(f.default)), name
        assert p.opts[0] == flag_of(name)
    for p in params.values():
        if p.hidden or p.name == "help":
            continue
        assert p.show_default, f"--{p.name} shows no default"
        shown += 1
    assert shown > 40
    text = runner.invoke(app, ["compress", "--help"]).output
    assert "--experimental" not in text and "--column-policy" not in text and "CVXQ allocation" in text


def test_every_option_of_every_command_shows_its_default():
    for name, cmd in typer.main.get_command(app).commands.items():
        for p in cmd.params:
            if p.param_type_name == "option" and not p.hidden and p.name != "help":
                assert p.show_default, f"rdquant {name} --{p.name} shows no default"


def test_recipe_nested_or_flat_means_the_same(tmp_path):
    flat, nested = tmp_path / "flat.yaml", tmp_path / "nested.yaml"
    flat.write_text("method: cvxq\ntarget_bits: 3.0\n")
    nested.write_text("compress:\n  method: cvxq\n  target_bits: 3.0\n")
    a, b = CompressConfig.from_yaml(flat), CompressConfig.from_yaml(nested)
    assert a == b and a.resolved().group_size == a.cvxq_cluster_rows == 128


@pytest.mark.parametrize("text,match", [
    ("bits: '4'\n", "bits .*must be an integer"),
    ("bits: 3.0\n", "bits .*must be an integer"),
    ("bits: 9\n", "bits .* choose one of"),
    ("group_size: 7\n", "group size"),
    ("calib_samples: 0\n", "calib_samples .*must be in"),
    ("bogus: 1\n", "unknown option 'bogus'"),
    ("bits: [4\n", "not valid YAML at line"),
    ("- 4\n", "must be a YAML mapping"),
    ("method: claq\ngroup_size: 32\n", "group_size is not used by method claq"),
    ("method: cvxq\ntarget_bits: 3\ngroup_size: 64\n", "cluster-rows"),
    ("claq_policy: outlier\nmethod: claq\n", "experimental"),
    ("method: ecsq\n", "experimental"),
    ("bits: 3\ncompress:\n  bits: 4\n", "under 'compress:' or none"),
    ("target_bits: .nan\nmethod: claq\n", "must be a number"),
])
def test_bad_recipes_are_one_line_errors(tmp_path, text, match):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    with pytest.raises(RdquantError, match=match):
        CompressConfig.from_yaml(p)


def test_experimental_options_are_set_only_through_their_namespace(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("method: claq\ntarget_bits: 3.1\nexperimental:\n  claq_policy: outlier\n  claq_outlier_frac: 0.01\n")
    cfg = CompressConfig.from_yaml(p)
    assert cfg.claq_policy == "outlier" and cfg.claq_outlier_frac == 0.01
    cfg = from_settings({"method": "ecsq", "target_coded_bits": 3.0}, {})
    assert cfg.method == "ecsq"
    with pytest.raises(RdquantError, match="not used by method gptq"):
        from_settings({"claq_policy": "outlier"}, {})


def test_random_recipe_values_only_ever_raise_named_errors():
    rng = random.Random(0)
    values = [None, True, False, 0, 1, -1, 2, 3, 7, 8, 9, 64, 128, -3, 0.5, 3.1, 1e9, -0.1, float("inf"), float("nan"),
              "", "4", "gptq", "cvxq", "claq", "rtn", "ecsq", "cluster", "group", "rd", "coded", "cuda", "cpu", "40MB",
              "x", [], ["a"], {"a": 1}, [1, 2]]
    keys = list(FIELDS) + ["bogus", "experimental", 3]
    ok = 0
    for _ in range(10_000):
        d = {rng.choice(keys): rng.choice(values) for _ in range(rng.randint(0, 5))}
        try:
            CompressConfig.from_dict(d)
            ok += 1
        except RdquantError:
            pass
    assert ok > 100  # the generator also makes valid recipes


def test_every_cli_flag_is_validated_before_the_model_is_loaded(tiny_model_dir, tmp_path, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the configuration was validated")

    monkeypatch.setattr("rdquant.models.load_model", no_load)
    base = ["compress", "--model", str(tiny_model_dir), "--out", str(tmp_path / "o")]
    assert "unknown codec" in _error(base + ["--codec", "nonsense"])
    assert "calib_samples" in _error(base + ["--calib-samples", "0"])
    assert "calib_seqlen" in _error(base + ["--calib-seqlen", "-5"])
    assert "not used by method claq" in _error(base + ["--method", "claq", "--group-size", "32"])
    assert "--cluster-rows" in _error(base + ["--method", "cvxq", "--target-bits", "3", "--group-size", "64"])
    assert "experimental" in _error(base + ["--method", "cvxq", "--target-bits", "3", "--sensitivity", "hessian"])
    assert "cannot read the size" in _error(base + ["--method", "cvxq", "--target-size", "-5MB"])
    assert "target_size" in _error(base + ["--method", "cvxq", "--target-size", "0MB"])
    assert "eval-windows" in _error(base + ["--eval-windows", "0"])
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    assert "not UTF-8" in _error(base + ["--calib", str(bad)])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("bits: [\n")
    assert "not valid YAML" in _error(base + ["--recipe", str(recipe)])
    import torch

    if not torch.cuda.is_available():
        assert "CUDA is not available" in _error(base + ["--device", "cuda"])
    assert "unknown device" in _error(base + ["--device", "gpu"])


def test_unreachable_targets_are_refused_before_calibration(tiny_model_dir, tmp_path, monkeypatch):
    def no_calibration(*a, **k):
        raise AssertionError("calibration ran before the target was checked")

    import sys

    monkeypatch.setattr(sys.modules["rdquant.compress"], "calibration_windows", no_calibration)
    for method in ("claq", "cvxq"):
        with pytest.raises(RdquantError, match="cannot be met: the smallest"):
            rdquant.compress(str(tiny_model_dir), CompressConfig(method=method, target_bits=0.5), progress=False)
    with pytest.raises(RdquantError, match=r"--target-size-total 1,000 bytes \(the smallest tensor file is [0-9,]+ "
                                           r"bytes\) cannot be met"):
        rdquant.compress(str(tiny_model_dir), CompressConfig(method="cvxq", target_size_total=1000), progress=False)


def test_eval_and_generate_refuse_bad_numbers_before_work(tiny_model_dir):
    m = str(tiny_model_dir)
    assert "--max-windows must be at least 1" in _error(["eval", m, "--max-windows", "-3"])
    assert "--seqlen must be at least 2" in _error(["eval", m, "--seqlen", "1"])
    assert "longer than the model's context" in _error(["eval", m, "--seqlen", "100000"])
    assert "--max-new-tokens must be at least 1" in _error(["generate", m, "--max-new-tokens", "0"])


def test_overwrite_never_deletes_what_rdquant_did_not_make(tiny_model_dir, text_file, tmp_path):
    mine = tmp_path / "my-files"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    args = ["compress", "--model", str(tiny_model_dir), "--calib", str(text_file), "--calib-samples", "2",
            "--calib-seqlen", "16", "--group-size", "32", "--no-progress"]
    assert "not an rdquant artifact" in _error(args + ["--out", str(mine), "--overwrite"])
    assert (mine / "thesis.tex").read_text() == "years of work"
    file_out = tmp_path / "file.bin"
    file_out.write_text("data")
    assert "not a directory" in _error(args + ["--out", str(file_out), "--overwrite"])
    assert file_out.read_text() == "data"
    art = tmp_path / "art"
    assert runner.invoke(app, args + ["--out", str(art)]).exit_code == 0
    assert "--overwrite" in _error(args + ["--out", str(art)])
    r = runner.invoke(app, args + ["--out", str(art), "--overwrite"])
    assert r.exit_code == 0, r.output


def test_without_out_each_run_gets_a_fresh_directory(tiny_model_dir, text_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["compress", "--model", str(tiny_model_dir), "--calib", str(text_file), "--calib-samples", "2",
            "--calib-seqlen", "16", "--group-size", "32", "--no-progress"]
    for _ in range(2):
        r = runner.invoke(app, args)
        assert r.exit_code == 0, r.output
    made = sorted(p.name for p in (tmp_path / "artifacts").iterdir())
    name = tiny_model_dir.name
    assert made == [f"{name}-gptq-w4g32", f"{name}-gptq-w4g32-2"]


def test_checkpoints_are_never_silently_discarded(tiny_model_dir, text_file, tmp_path, monkeypatch):
    out = tmp_path / "art"
    args = ["compress", "--model", str(tiny_model_dir), "--calib", str(text_file), "--calib-samples", "2",
            "--calib-seqlen", "16", "--group-size", "32", "--no-progress", "--out", str(out)]
    import rdquant.pipeline as pipeline

    real = pipeline.Checkpoint.save_block

    def interrupt_after_first(self, i, *a, **k):
        real(self, i, *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.Checkpoint, "save_block", interrupt_after_first)
    r = runner.invoke(app, args)
    assert r.exit_code == 130 and "--resume" in r.output and f"--out {out}" in r.output
    ckpt = tmp_path / "art.partial"
    assert (ckpt / "progress.json").is_file()
    monkeypatch.setattr(pipeline.Checkpoint, "save_block", real)
    assert "add --resume to continue it, or --overwrite to discard it" in _error(args)
    assert ckpt.is_dir()
    r = runner.invoke(app, args + ["--resume"])
    assert r.exit_code == 0, r.output
    assert out.is_dir() and not ckpt.exists()


def test_failed_runs_leave_no_empty_checkpoint(tiny_model_dir, text_file, tmp_path, monkeypatch):
    import rdquant.pipeline as pipeline

    def fail(*a, **k):
        raise RdquantError("simulated failure in the first block")

    monkeypatch.setattr(pipeline, "capture_block_inputs", fail)
    out = tmp_path / "art"
    msg = _error(["compress", "--model", str(tiny_model_dir), "--calib", str(text_file), "--calib-samples", "2",
                  "--calib-seqlen", "16", "--group-size", "32", "--no-progress", "--out", str(out)])
    assert "simulated failure" in msg
    assert not (tmp_path / "art.partial").exists() and not out.exists()


def test_version_and_debug(tmp_path):
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"rdquant {rdquant.__version__}"
    r = runner.invoke(app, ["--debug", "inspect", str(tmp_path)])
    assert r.exit_code == 2 and "Traceback" in r.output and "error: " in r.output


def test_config_dataclass_round_trips_through_its_dict():
    cfg = CompressConfig(method="cvxq", target_bits=3.0)
    again = CompressConfig(**cfg.to_dict())
    assert again == cfg and json.loads(json.dumps(cfg.to_dict())) == cfg.to_dict()
    assert all(f.metadata.get("help") for f in dataclasses.fields(CompressConfig))
