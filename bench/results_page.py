"""Write the results page (BENCHMARKS.md) and its plot (docs/ppl_vs_bits.png) from bench/results/*.json,
so the page cannot drift from the measurements (tests/test_results_page.py checks it).

    python bench/results_page.py            # page + plot (matplotlib, from the `bench` extra)
    python bench/results_page.py --no-plot  # page only; needs no matplotlib

Each JSON file answers one question and becomes one table:

    title, question, intro   text above the table (markdown)
    columns                  [[key, header], ...] or [key, header, format]: format is a Python format
                             spec for float values (".3f"); ints print with thousands separators,
                             strings as they are (so "~14" or "8.1%" stay as recorded), null as "-"
    sort                     optional: row keys to sort by (nulls last)
    plot                     optional (one file): {x, y, series, file, xmax, ymax, baseline}: y against
                             x, one line per row["series"] (default: the `series` keys joined), rows
                             whose tool is `baseline` as a horizontal line
    rows                     one dict per measurement: the column keys, and always
                               command  the exact command line that produced it
                               source   where it is recorded ("docs/notes/benchmarks-lab.md §N", an
                                        issue, a script's run); "as recorded in ..." where the
                                        notebook gives no exact command
                               date     ISO date (or month) of the measurement; date_source when it
                                        is not the notebook's own
                               machine  the machine as recorded
                             and optionally series, note, and fields a writer uses to replace its
                             own rows (quality_row: bench/quality.py --results; device, model,
                             artifact, runtime: bench/generate_speed.py)

coding.json rows also carry scale_bits (mantissa bits kept in the fp16 group scales: 10 = all, 7 = the
default; null for layouts without affine group scales), so a before/after pair is two rows of one
artifact differing in scale_bits, each with its ppl and % saved.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PAGE = ROOT / "BENCHMARKS.md"
NOTEBOOK = "docs/notes/benchmarks-lab.md"
ORDER = ("accuracy", "whole_file", "kquant", "slim", "slim_gpu", "kv", "kv_generate", "kv_decode", "offload", "compress_time", "scale", "generation", "gpu_kernels", "coding")  # the page's order; others follow


def load_results(folder: Path = RESULTS) -> list[tuple[str, dict]]:
    """(name, content) of every results file, in the page's order."""
    files = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}
    names = [n for n in ORDER if n in files] + sorted(n for n in files if n not in ORDER)
    return [(n, files[n]) for n in names]


def cell(value, fmt: str | None = None) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return format(value, fmt) if fmt else format(value, ".6g")
    return str(value).replace("|", "\\|")


def sorted_rows(result: dict) -> list[dict]:
    rows = result["rows"]
    for key in reversed(result.get("sort", [])):
        rows = sorted(rows, key=lambda r: (r.get(key) is None, r.get(key)))
    return rows


def table(result: dict) -> list[str]:
    """A markdown table of the result's columns, a reference per row to the command that made it,
    the commands listed under it and where each is recorded."""
    rows = sorted_rows(result)
    columns = [(c[0], c[1], c[2] if len(c) > 2 else None) for c in result["columns"]]
    commands: list[str] = []
    for r in rows:
        if r["command"] not in commands:
            commands.append(r["command"])
    headers = [h for _, h, _ in columns] + ["cmd"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        cells = [cell(r.get(k), f) for k, _, f in columns] + [f"[{commands.index(r['command']) + 1}]"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for k, cmd in enumerate(commands, 1):
        lines.append(f"[{k}] `{cmd}`  ")
    sources: dict[str, list[int]] = {}
    for r in rows:
        sources.setdefault(r["source"], []).append(commands.index(r["command"]) + 1)
    lines += ["", "Sources: " + "; ".join(f"{s} ({', '.join(f'[{i}]' for i in sorted(set(ks)))})"
                                          for s, ks in sources.items()) + "."]
    return lines


def page(results: list[tuple[str, dict]], plot_file: str | None) -> str:
    lines = [
        "# Results",
        "",
        "What rdquant reaches on the default model (SmolLM2-135M-Instruct) and how it compares with the tools",
        "users reach for today: accuracy against size, compress time, load and generation speed, and file size",
        "with entropy coding. Every figure comes from `bench/results/*.json` with the command that measured it",
        "(listed under its table). This page is generated: edit the JSON and run `python bench/results_page.py`",
        "(a test fails when the page and the JSON differ). The lab notebook with every experiment and its",
        f"reasoning is [{NOTEBOOK}]({NOTEBOOK}).",
        "",
    ]
    for _, result in results:
        lines += [f"## {result['title']}", "", f"*{result['question']}*", "", result["intro"], ""]
        if plot_file and "plot" in result:
            lines += [f"![{result['title']}]({plot_file})", ""]
        lines += table(result) + [""]
    return "\n".join(lines).rstrip() + "\n"


def plot(result: dict, out: Path) -> None:
    """Perplexity (log) against bits/weight, one series per tool and method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = result["plot"]
    series: dict[str, list[tuple[float, float]]] = {}
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for r in result["rows"]:
        x, y = r.get(spec["x"]), r.get(spec["y"])
        if r.get("tool") == spec.get("baseline") and y is not None:
            ax.axhline(y, color="black", linestyle="--", linewidth=1, label=f"{r['tool']} ({r['method']}): {y}")
            continue
        if x is None or y is None or x > spec.get("xmax", float("inf")):
            continue
        label = r.get("series") or " ".join(str(r[k]) for k in spec["series"])
        series.setdefault(label, []).append((x, y))
    for name, pts in sorted(series.items()):
        pts.sort()
        alone = len(pts) == 1  # a single point (a tuned artifact) as a star, so it is not read as a curve
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="*" if alone else "o",
                markersize=11 if alone else 6, label=name)
    ax.set_yscale("log")
    if "ymax" in spec:
        hidden = [r for r in result["rows"] if (r.get(spec["y"]) or 0) > spec["ymax"]]
        ax.set_ylim(top=spec["ymax"])
        if hidden:
            ax.text(0.01, 0.01, "off the chart: " + "; ".join(
                f"{r['tool']} {r['method']} {r['setting']} ({cell(r[spec['y']], ',.3f')} at {r[spec['x']]})"
                for r in hidden), transform=ax.transAxes, fontsize=7)
    ax.set_xlabel("bits per weight, all-in (decoder linears)")
    ax.set_ylabel("WikiText-2 perplexity (log)")
    ax.set_title("SmolLM2-135M: perplexity against size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-plot", action="store_true", help="write the page only (no matplotlib needed)")
    args = ap.parse_args()
    results = load_results()
    plotted = next((r for _, r in results if "plot" in r), None)
    PAGE.write_text(page(results, plotted["plot"]["file"] if plotted else None))
    print(f"wrote {PAGE}")
    if plotted and not args.no_plot:
        plot(plotted, ROOT / plotted["plot"]["file"])
        print(f"wrote {ROOT / plotted['plot']['file']}")


if __name__ == "__main__":
    main()
