"""Whole-file size against perplexity (issue 21): every tensor of the file counts, embedding and head
included (llama.cpp's basis), on the default model and on a second architecture.

    python bench/whole_file.py                                   # the default rows on the default model
    python bench/whole_file.py --model gemma3-270m --windows 8 --calib-samples 32
    python bench/whole_file.py --rows "method=cvxq file_bits=3.0" "method=cvxq file_bits=3.0 embed_bits=4"
    python bench/whole_file.py ... --results                     # and publish: bench/results/whole_file.json

A row is `KEY=VALUE ...` of CompressConfig fields, plus `file_bits=B`: the tensor file at B bits per
parameter (--target-size-total = B x parameters / 8, cvxq), and `codec=C`: the artifact saved entropy-coded
(`rdquant compress --codec C`; default none, and auto with `cvxq_rate=coded`, whose target is the coded size). Two size figures: *tensors bits/param*
(every tensor: the safetensors file, llama.cpp's basis of all tensors) and *whole-file bits/param*
(every file of the artifact: tokenizer, manifest and config too; Gemma's tokenizer.json alone is 33 MB). The embedding / head width is the row's
`embed_bits` (default: auto, which cvxq's allocation chooses and other methods take as 8). Protocol
as bench/quality.py: WikiText-2 test windows, C4 calibration (seed 0); the loaded artifact is
evaluated. Rows are cached in bench/cache/rows; --fresh recomputes them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import rdquant  # noqa: E402
from quality import CACHE, ROOT, _typed, cached_row, calib_file, eval_row, publish_rows  # noqa: E402
from rdquant.data import shared_data_dir  # noqa: E402
from rdquant.models import load_model, resolve_model  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "whole_file.json"
DEFAULT_ROWS = ["method=gptq bits=3 group_size=64 embed_bits=8", "method=gptq bits=3 group_size=64 embed_bits=4",
                "method=cvxq file_bits=3.0", "method=cvxq file_bits=3.0 embed_bits=4"]


def parse_row(text: str, params: int) -> tuple[str, rdquant.CompressConfig, float | None, str]:
    """(cache name, config, whole-file target in bits per parameter or None, save codec) of a row spec."""
    pairs = text.split()
    file_bits = None
    codec = None
    rest = []
    for p in pairs:
        k, _, v = p.partition("=")
        if k == "file_bits":
            file_bits = float(v)
        elif k == "codec":
            codec = v
        else:
            rest.append(p)
    typed = _typed(rest)
    if file_bits is not None:
        typed["target_size_total"] = int(file_bits * params / 8)
    name = "_".join(p.replace("=", "") for p in sorted(pairs))
    cfg = rdquant.CompressConfig(**typed)
    return name, cfg, file_bits, codec or ("auto" if cfg.cvxq_rate == "coded" else "none")


def run(name: str, cfg: rdquant.CompressConfig, file_bits: float | None, args, calib: Path, codec: str = "none") -> dict:
    model, tok, mid = load_model(args.model)
    t0 = time.perf_counter()
    cm = rdquant.compress(model, cfg, tokenizer=tok, calib_ids=load_file(calib)["input_ids"], model_id=mid)
    seconds = time.perf_counter() - t0
    out = cm.save(CACHE / "artifacts" / f"{args.model}_{name}", overwrite=True, codec=codec)
    del cm, model
    rep = rdquant.inspect(out)
    vocab = [l for l in rep.layers if l.kind != "linear"]
    method = cfg.method + (f" ({cfg.cvxq_sensitivity} sensitivity)" if cfg.method == "cvxq" and
                           cfg.cvxq_sensitivity != "gradient" else "")
    row = {"tool": "rdquant", "model": args.model, "spec": name, "method": method,
           "setting": (f"file {file_bits} bits/param" + (f", {cfg.cvxq_rate} rate, codec {codec}" if codec != "none" else "")
                       if file_bits is not None else
                       f"target {cfg.target_bits}" if cfg.target_bits is not None else f"{cfg.bits}-bit g{cfg.group_size}"),
           "embed": "16-bit" if not vocab else "/".join(sorted({f"{l.bits}-bit" if l.mean_width is None else
                                                                f"{l.mean_width:.2f}-bit mean" for l in vocab}))
                    + (" (allocated)" if cfg.embed_bits == -1 and cfg.method == "cvxq" else ""),
           "tensor_bits_per_param": round(rep.tensor_bits_per_param, 3),
           "file_bytes": rep.total_bytes, "file_mib": round(rep.total_bytes / 2**20, 2),
           "file_bits_per_param": round(rep.file_bits_per_param, 3), "ratio": round(rep.compression_ratio, 2),
           "linear_bits_per_weight": round(rep.bits_per_weight, 3), "compress_seconds": round(seconds, 1),
           "threads": torch.get_num_threads()}
    row.update(eval_row(rdquant.load(out), tok, args))
    return row


def table(rows: list[dict], args) -> str:
    lines = [f"{args.model}: WikiText-2 test, first {args.windows} x {args.seqlen} windows; calibration "
             f"{args.calib_samples} x {args.calib_seqlen} C4 tokens", "",
             "| tool | method | setting | embedding / head | tensors bits/param | file MiB | whole-file bits/param | "
             "ratio vs 16-bit | linear bits/weight | ppl | compress s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = lambda k, fmt: "-" if r.get(k) is None else format(r[k], fmt)
        lines.append(f"| {r['tool']} | {r['method']} | {r.get('setting', '-')} | {r.get('embed', '-')} | "
                     f"{f('tensor_bits_per_param', '.3f')} | {f('file_mib', '.2f')} | {f('file_bits_per_param', '.3f')} | "
                     f"{f('ratio', '.2f')} | "
                     f"{f('linear_bits_per_weight', '.3f')} | {r['ppl']:.3f} | {f('compress_seconds', '.0f')} |")
    return "\n".join(lines)


def publish(rows: list[dict], args) -> None:
    """This run's measured rows into bench/results/whole_file.json (a published row of the same model and
    spec is replaced), then the results page."""
    publish_rows(RESULTS, rows, lambda r: (r.get("model"), r.get("spec")), "whole_file.py")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, metavar="SPEC")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--fresh", action="store_true", help="recompute cached rows")
    ap.add_argument("--results", action="store_true", help="publish the measured rows (bench/results/whole_file.json)")
    args = ap.parse_args()
    if shared_data_dir() is None:
        raise SystemExit("needs ../shared/data (WikiText-2 and the C4 sample)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model(args.model).path)
    calib = calib_file(tok, args.calib_samples, args.calib_seqlen, 0,
                       "" if args.model == "smollm2-135m" else f"{args.model}_")  # another tokenizer's windows apart
    tag = f"{args.model}_w{args.windows}s{args.seqlen}c{args.calib_samples}x{args.calib_seqlen}_v{rdquant.__version__}"
    model, mtok, _ = load_model(args.model)
    params = sum(t.numel() for t in {p.data_ptr(): p for p in model.parameters()}.values())
    orig = cached_row(f"wholefile_original_{tag}", False, lambda: {
        "tool": "original", "model": args.model, "spec": "original", "method": "16-bit", "embed": "16-bit",
        "file_bits_per_param": 16.0, "tensor_bits_per_param": 16.0, "ratio": 1.0, "file_mib": round(2 * params / 2**20, 2),
        **eval_row(model, mtok, args)})
    del model
    rows = [orig]
    for spec in args.rows:
        name, cfg, file_bits, codec = parse_row(spec, params)
        row = cached_row(f"wholefile_{name}_{tag}", args.fresh, lambda: run(name, cfg, file_bits, args, calib, codec))
        rows.append(row)
        print(table(rows, args), flush=True)
    if args.results:
        publish(rows, args)
    print("\n" + table(rows, args))


if __name__ == "__main__":
    main()
