"""The results page is what bench/results_page.py makes from bench/results/*.json: it cannot drift
from the measurements, and every figure says which command produced it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("results_page", ROOT / "bench" / "results_page.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_page_matches_the_json():
    rp = _script()
    results = rp.load_results()
    plot = next((r["plot"]["file"] for _, r in results if "plot" in r), None)
    assert (ROOT / "BENCHMARKS.md").read_text() == rp.page(results, plot), \
        "BENCHMARKS.md is stale: run python bench/results_page.py"
    assert plot is None or (ROOT / plot).is_file()


def test_every_row_names_its_command_and_source():
    names = set()
    for name, result in _script().load_results():
        names.add(name)
        assert result["title"] and result["intro"] and result["columns"] and result["rows"], name
        for row in result["rows"]:
            assert row.get("command") and row.get("source"), (name, row)
    assert {"accuracy", "compress_time", "generation", "coding"} <= names
