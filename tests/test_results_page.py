"""The results page is what bench/results_page.py makes from bench/results/*.json: it cannot drift
from the measurements, and every figure says which command produced it, where, when and on what."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("results_page", ROOT / "bench" / "results_page.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_page_matches_the_json_without_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # any import of it fails: the page must not need it
    rp = _script()
    results = rp.load_results()
    plot = next((r["plot"]["file"] for _, r in results if "plot" in r), None)
    assert (ROOT / "BENCHMARKS.md").read_text() == rp.page(results, plot), \
        "BENCHMARKS.md is stale: run python bench/results_page.py"
    assert plot is None or (ROOT / plot).is_file()


def test_every_row_names_its_command_source_date_and_machine():
    names = set()
    for name, result in _script().load_results():
        names.add(name)
        assert result["title"] and result["question"] and result["intro"] and result["columns"] and result["rows"], name
        for row in result["rows"]:
            for field in ("command", "source", "date", "machine"):
                assert isinstance(row.get(field), str) and row[field].strip(), (name, field, row)
    assert {"accuracy", "compress_time", "generation", "coding"} <= names


def test_figures_agree_within_a_row_and_writers_can_find_their_rows():
    results = dict(_script().load_results())
    keys = [r["quality_row"] for r in results["accuracy"]["rows"] if "quality_row" in r]
    assert len(keys) == len(set(keys)), "bench/quality.py --results matches rows by quality_row"
    for r in results["accuracy"]["rows"]:
        if r.get("linear_bytes") is not None:
            assert r["linear_mb"] == round(r["linear_bytes"] / 1e6, 2), r
    for r in results["coding"]["rows"]:  # a --scale-bits before/after is two rows differing in scale_bits
        assert "scale_bits" in r and "ppl" in r and "auto_saved" in r, r
