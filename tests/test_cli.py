"""CLI smoke tests on a tiny random model, and its one-line errors."""

import json

from typer.testing import CliRunner

from rdquant.cli import app

runner = CliRunner()


def test_compress_inspect_eval_generate(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "art"
    r = runner.invoke(app, ["compress", "--model", str(tiny_model_dir), "--bits", "4", "--group-size", "32",
                            "--calib", str(text_file), "--calib-samples", "4", "--calib-seqlen", "32",
                            "--out", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "bits/weight all-in" in r.output
    assert (out / "quant_log.json").is_file() and not (tmp_path / "art.partial").exists()
    log = json.loads((out / "quant_log.json").read_text())
    log = [e for e in log if e["proxy_error_rtn"] is not None]  # an untied embedding is rounded, without H
    assert log and all(e["proxy_error"] <= e["proxy_error_rtn"] * 1.0001 for e in log)
    r = runner.invoke(app, ["inspect", str(out)])
    assert r.exit_code == 0 and "compression ratio" in r.output and "q_proj" in r.output
    r = runner.invoke(app, ["inspect", str(out), "--json"])
    rep = json.loads(r.output)
    assert rep["bits_per_weight"] > 4 and rep["vocab_params"] > 0 and rep["vocab_bytes"] > 0
    r = runner.invoke(app, ["eval", str(out), "--data", str(text_file), "--seqlen", "64", "--max-windows", "2",
                            "--no-progress", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["windows"] == 2 and res["tokens"] == 128 and res["ppl"] > 1
    r = runner.invoke(app, ["generate", str(out), "--prompt", "the", "--max-new-tokens", "4"])
    assert r.exit_code == 0, r.output


def _error(args):
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    errors = [l for l in r.output.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in r.output, r.output
    return errors[0]


def test_one_line_errors(tiny_model_dir, tmp_path):
    assert "model not found" in _error(["compress", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert "choose one of 2, 3" in _error(["compress", "--model", str(tiny_model_dir), "--bits", "9", "--out", str(tmp_path / "o")])
    assert "group size" in _error(["compress", "--model", str(tiny_model_dir), "--group-size", "7",
                                   "--out", str(tmp_path / "o")])
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert "no text" in _error(["compress", "--model", str(tiny_model_dir), "--calib", str(empty),
                                "--out", str(tmp_path / "o")])
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    assert "fewer than one window" in _error(["compress", "--model", str(tiny_model_dir), "--calib", str(short),
                                              "--out", str(tmp_path / "o")])
    assert "not an rdquant artifact" in _error(["inspect", str(tmp_path)])
    assert "--resume" in _error(["compress", "--model", str(tiny_model_dir), "--resume", "--out", str(tmp_path / "o")])


def test_claq_from_the_command_line(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "c"
    r = runner.invoke(app, ["compress", "--model", str(tiny_model_dir), "--method", "claq", "--target-bits", "3.5",
                            "--experimental", "claq_outlier_frac=0.01", "--experimental", "claq_policy=outlier", "--calib", str(text_file),
                            "--calib-samples", "4", "--calib-seqlen", "32", "--out", str(out), "--no-progress",
                            "--entropy-lambda", "0.5"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "manifest.json").read_text())["recipe"]["claq_entropy_lambda"] == 0.5
    assert "codebooks" in r.output and "outliers" in r.output
    rep = json.loads(runner.invoke(app, ["inspect", str(out), "--json"]).output)
    assert rep["bits_per_weight"] <= 3.5 and rep["split_bits_per_weight"]["outliers"] > 0
    assert "cannot be met" in _error(["compress", "--model", str(tiny_model_dir), "--method", "claq",
                                      "--target-bits", "0.2", "--calib", str(text_file), "--calib-samples", "4",
                                      "--calib-seqlen", "32", "--out", str(tmp_path / "o")])
    assert "not supported" in _error(["compress", "--model", str(tiny_model_dir), "--target-bits", "3",
                                      "--out", str(tmp_path / "o")])


def test_compress_with_eval_streams_a_safetensors_directory(tiny_model_dir, text_file, tmp_path):
    """An HF directory is compressed one block at a time (the CLI's streamed source); --eval then
    evaluates the written artifact beside the original."""
    out = tmp_path / "ev"
    r = runner.invoke(app, ["compress", "--model", str(tiny_model_dir), "--bits", "4", "--calib", str(text_file),
                            "--calib-samples", "4", "--calib-seqlen", "32", "--eval", "--eval-windows", "1",
                            "--eval-seqlen", "64", "--out", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "original (16-bit" in r.output and "rdquant  (" in r.output and "embedding / head" in r.output
