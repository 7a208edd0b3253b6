"""SLiM (issue 22): 2:4 (and unstructured 50%) sparsity + quantization + low-rank adapters against the same-size baselines, on
the default model.

    python bench/slim.py                                  # the default rows
    python bench/slim.py --rows "method=slim" "method=slim lowrank=0.1"
    python bench/slim.py ... --results                    # and publish: bench/results/slim.json
    python bench/slim.py --plot                           # the rank sweep's plot from the published rows

A row is `label|KEY=VALUE ...` of CompressConfig fields (the label names the configuration in the
table). Baselines are rdquant's own configurations of the same solvers: SparseGPT + GPTQ is `--mask
sparsegpt --slim-solver gptq` (SparseGPT's prune-and-quantize sweep), Wanda + RTN is `--mask wanda
--slim-solver rtn`; llm-compressor's sparse modifiers are not used (its sparse compression was removed
in 2026). Protocol: calibration 128 x 512 tokens from the first 800 documents of the C4 file in
../shared/data/c4 (seed 0); perplexity on WikiText-2 test (the first --windows x 2048 windows) and on
the last 200 C4 documents, which calibration never sees (held out; up to --windows windows). The
embedding and head stay 16-bit (the page compares decoder linears). Rows are cached in
bench/cache/rows with the command that measured them; --fresh recomputes them; --results publishes the
table's rows, cached ones with their own command.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import rdquant  # noqa: E402
from quality import CACHE, ROOT, _typed, cached_row, provenance, publish_rows  # noqa: E402
from rdquant.data import calibration_windows, read_documents, shared_data_dir  # noqa: E402
from rdquant.models import load_model  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "slim.json"
CALIB_DOCS = 800  # C4 documents calibration draws from; the rest are the held-out evaluation text
DEFAULT_ROWS = [
    "original|",
    "Wanda + RTN, 2:4 4-bit g64|method=slim slim_mask=wanda slim_solver=rtn slim_refit=false",
    "SparseGPT + GPTQ, 2:4 4-bit g64|method=slim slim_mask=sparsegpt slim_refit=false",
    "Wanda + GPTQ, 2:4 4-bit g64|method=slim slim_mask=wanda slim_refit=false",
    "SLiM-Quant + Wanda (paper's SLiM), 2:4 4-bit per matrix|method=slim slim_mask=wanda slim_solver=rtn slim_scale=matrix slim_refit=false",
    "rdquant slim (SparseGPT mask + re-fit + GPTQ), 2:4 4-bit g64|method=slim slim_mask=sparsegpt slim_refit=true",
    "SparseGPT + GPTQ + adapters r=10%|method=slim slim_mask=sparsegpt slim_refit=false lowrank=0.1",
    "Wanda + GPTQ + adapters r=10%|method=slim slim_mask=wanda slim_refit=false lowrank=0.1",
    "SLiM-Quant + Wanda + adapters r=10% (paper's SLiM)|method=slim slim_mask=wanda slim_solver=rtn slim_scale=matrix slim_refit=false lowrank=0.1",
    "rdquant slim + adapters r=10%|method=slim slim_mask=sparsegpt slim_refit=true lowrank=0.1",
    "rdquant slim + adapters r=5%|method=slim slim_mask=sparsegpt slim_refit=true lowrank=0.05",
    "rdquant slim + adapters r=20%|method=slim slim_mask=sparsegpt slim_refit=true lowrank=0.2",
    "SparseGPT + GPTQ, unstructured 50% 4-bit g64|method=slim slim_pattern=unstructured slim_refit=false",
    "rdquant slim, unstructured 50% 4-bit g64|method=slim slim_pattern=unstructured slim_mask=sparsegpt slim_refit=true",
    "rdquant slim, unstructured 50% + adapters r=10%|method=slim slim_pattern=unstructured slim_mask=sparsegpt slim_refit=true lowrank=0.1",
    "GPTQ 3-bit g64|method=gptq bits=3",
    "CVXQ 3.25 bits|method=cvxq target_bits=3.25",
    "CVXQ 3.25 bits incl. adapters r=10%|method=cvxq target_bits=3.25 lowrank=0.1",
    "CVXQ 3.25 bits, adapters where the allocation finds they pay (--lowrank auto)|method=cvxq target_bits=3.25 lowrank=-1",
]


def held_out_files(tok) -> tuple[Path, Path]:
    """(calibration windows file, held-out C4 text file) of this protocol, cached."""
    docs = read_documents(shared_data_dir() / "c4" / "c4_calib_1k.jsonl")
    calib_docs, held = CACHE / "c4_first800.jsonl", CACHE / "c4_last200.jsonl"
    for path, part in ((calib_docs, docs[:CALIB_DOCS]), (held, docs[CALIB_DOCS:])):
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
    calib = CACHE / "calib_c4first800_128x512_seed0.safetensors"
    if not calib.is_file():
        save_file({"input_ids": calibration_windows(tok, calib_docs, 128, 512, 0)}, calib)
    return calib, held


def parse_row(text: str) -> tuple[str, str, dict]:
    label, _, spec = text.partition("|")
    typed = _typed(spec.split()) if spec.strip() else {}
    name = "slim_" + ("_".join(p.replace("=", "") for p in sorted(spec.split())) or "original")
    return name, label.strip(), typed


def evaluate_both(model, tok, held: Path, args) -> dict:
    wiki = rdquant.evaluate(model, tok, seqlen=2048, max_windows=args.windows, progress=False)
    c4 = rdquant.evaluate(model, tok, data=str(held), seqlen=2048, max_windows=args.windows, progress=False)
    return {"ppl": wiki.ppl, "c4_ppl": c4.ppl, "tokens": wiki.tokens, "c4_tokens": c4.tokens}


def run(label: str, typed: dict, name: str, calib: Path, held: Path, args) -> dict:
    from safetensors.torch import load_file

    model, tok, mid = load_model(args.model)
    row = {"tool": "rdquant", "config": label, "spec": " ".join(f"{k}={v}" for k, v in typed.items()),
           **provenance("slim.py")}
    if not typed:  # the original model
        row.update({"tool": "baseline", "linear_bits_per_weight": 16.0})
        row.update(evaluate_both(model, tok, held, args))
        return row
    cfg = rdquant.CompressConfig(embed_bits=16, **typed)
    t0 = time.perf_counter()
    cm = rdquant.compress(model, cfg, tokenizer=tok, calib_ids=load_file(calib)["input_ids"], model_id=mid)
    row["compress_seconds"] = round(time.perf_counter() - t0, 1)
    out = cm.save(CACHE / "artifacts" / name, overwrite=True)
    del cm, model
    rep = rdquant.inspect(out)
    split = rep.split_bits()
    row.update({"linear_bits_per_weight": round(rep.bits_per_weight, 3), "adapter_bits": round(split["adapters"], 3),
                "sparsity_bits": round(split["sparsity"], 3), "code_bits": round(split["codes"], 3),
                "file_mib": round(rep.total_bytes / 2**20, 2)})
    row.update(evaluate_both(rdquant.load(out), tok, held, args))
    return row


def table(rows: list[dict], args) -> str:
    lines = [f"{args.model}: WikiText-2 test and held-out C4, first {args.windows} x 2048 windows; calibration "
             "128 x 512 tokens of the first 800 C4 documents", "",
             "| configuration | linear bits/weight (all-in) | of which adapters | sparsity positions | WikiText-2 ppl | "
             "C4 ppl (held out) | compress s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        f = lambda k, fmt: "-" if r.get(k) is None else format(r[k], fmt)
        lines.append(f"| {r['config']} | {f('linear_bits_per_weight', '.3f')} | {f('adapter_bits', '.3f')} | "
                     f"{f('sparsity_bits', '.3f')} | {r['ppl']:.3f} | {r['c4_ppl']:.3f} | {f('compress_seconds', '.0f')} |")
    return "\n".join(lines)


def publish(rows: list[dict], args) -> None:
    """The table's rows into bench/results/slim.json, each with the command, machine and date it was
    measured with (a cached row keeps its own; a published row of the same spec is replaced)."""
    publish_rows(RESULTS, rows, lambda r: r.get("spec"), "slim.py", stamped=True)


PLOT = ROOT / "bench" / "plots" / "slim_rank_sweep.png"


def plot() -> Path:
    """WikiText-2 perplexity against all-in bits/weight of the published rows: rdquant slim 2:4 at rank
    0 / 5 / 10 / 20%, unstructured 50%, and the dense rows (bench/plots/slim_rank_sweep.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = json.loads(RESULTS.read_text())["rows"]
    spec = lambda r: r.get("spec", "")
    sweep = sorted((r for r in rows if spec(r).startswith("method=slim slim_mask=sparsegpt slim_refit=True")
                    and "slim_pattern" not in spec(r)), key=lambda r: r["linear_bits_per_weight"])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot([r["linear_bits_per_weight"] for r in sweep], [r["ppl"] for r in sweep], "o-", label="rdquant slim 2:4, rank 0 / 5 / 10 / 20%")
    for r in sweep:
        rank = spec(r).partition("lowrank=")[2] or "0"
        ax.annotate(f"r={float(rank):.0%}", (r["linear_bits_per_weight"], r["ppl"]), textcoords="offset points", xytext=(4, 4))
    for r in rows:
        if "slim_pattern=unstructured" in spec(r) or spec(r).startswith(("method=gptq", "method=cvxq")):
            ax.plot(r["linear_bits_per_weight"], r["ppl"], "s", label=r["config"])
    orig = next((r["ppl"] for r in rows if r.get("tool") == "original" or r.get("config") == "original"), None)
    if orig:
        ax.axhline(orig, color="grey", ls=":", label="original (16-bit)")
    ax.set_xlabel("linear bits/weight, all-in (adapters and positions included)")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_yscale("log")
    ax.legend(fontsize=6)
    ax.set_title("SLiM on SmolLM2-135M: perplexity against size")
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=120)
    return PLOT


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, metavar="LABEL|SPEC")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--fresh", action="store_true", help="recompute cached rows")
    ap.add_argument("--results", action="store_true", help="publish the measured rows (bench/results/slim.json)")
    ap.add_argument("--plot", action="store_true", help="only draw bench/plots/slim_rank_sweep.png from the published rows")
    args = ap.parse_args()
    if args.plot:
        print(f"wrote {plot()}")
        return
    if shared_data_dir() is None:
        raise SystemExit("needs ../shared/data (WikiText-2 and the C4 file)")
    _, tok, _ = load_model(args.model)
    calib, held = held_out_files(tok)
    rows = []
    for text in args.rows:
        name, label, typed = parse_row(text)
        row = cached_row(f"{name}_w{args.windows}", args.fresh, lambda: run(label, typed, name, calib, held, args))
        row["config"] = label
        rows.append(row)
        print(table(rows, args), flush=True)
    if args.results:
        publish(rows, args)


if __name__ == "__main__":
    main()
