"""llama.cpp k-quants, solved by rdquant in their own grids (`--grid gguf:TYPE`) against llama.cpp's own quantizer
writing the same types (issue: export). For each type, three GGUF files whose decoder linears have the same
type tensor for tensor (the k-quant where rows are whole 256-weight super-blocks, the type's block-32
fallback elsewhere) and so the same bytes:

  llama.cpp      its quantizer, every tensor the type (`pure`), no imatrix (bench/peers/llamacpp_requant.py,
                 run with --llama-python), from the package GGUF the float model was dequantized from
  rdquant rtn    `--method rtn --grid gguf:TYPE`, exported to GGUF
  rdquant gptq   `--method gptq --grid gguf:TYPE`, exported to GGUF

Each file's linears are read back with the gguf package and put into the float model, which is scored on the
first WikiText-2 windows; rdquant's rows also check that the export holds the artifact's weights exactly.
Token embedding and head stay 16-bit everywhere (the comparison is the linears').

    python bench/kquant.py --types Q4_K Q3_K Q2_K --windows 32 --llama-python /work/.cache/llama-venv/bin/python
    python bench/kquant.py --results      # the results page's table from bench/results/kquant.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from export import gguf_linears, gguf_weight_error  # noqa: E402

import rdquant  # noqa: E402
from rdquant.evaluate import load_any  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "kquant.json"
LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def linear_types(path: Path) -> tuple[float, dict[str, int], int]:
    """(bits per decoder-linear weight, how many linears of each GGUF type, their bytes) of a GGUF file."""
    import gguf

    n = nbytes = 0
    types: Counter = Counter()
    for t in gguf.GGUFReader(str(path)).tensors:
        if t.name.startswith("blk.") and t.name.split(".")[2] in LINEARS:
            n += int(t.n_elements)
            nbytes += int(t.n_bytes)
            types[t.tensor_type.name] += 1
    return 8 * nbytes / n, dict(types), nbytes


def score(path: Path, args) -> float:
    """WikiText-2 perplexity of the float model with its decoder linears from the GGUF file at `path`."""
    model, tok = load_any(args.model)
    with torch.no_grad():
        for name, W in gguf_linears(path, model.config).items():
            model.get_submodule(name).weight.copy_(W)
    return rdquant.evaluate(model, tok, seqlen=args.seqlen, max_windows=args.windows, progress=False).ppl


def llama_cpp_row(gtype: str, args, tmp: Path) -> dict:
    from rdquant.models import alias_gguf

    out = tmp / f"llamacpp-{gtype}.gguf"
    res = subprocess.run([args.llama_python, str(Path(__file__).parent / "peers" / "llamacpp_requant.py"),
                          str(alias_gguf(args.model)), str(out), gtype, "--threads", str(torch.get_num_threads())],
                         capture_output=True, text=True, check=True)
    info = json.loads(res.stdout.strip().splitlines()[-1])
    bits, types, nbytes = linear_types(out)
    return {"tool": "llama.cpp", "method": f"quantize (pure, no imatrix), llama-cpp-python {info['version']}", "type": gtype,
            "seconds": round(info["wall_s"], 1), "linear_bits": round(bits, 4), "linear_bytes": nbytes, "types": types,
            "ppl": round(score(out, args), 4), "exact_export": None}


def rdquant_row(gtype: str, method: str, args, tmp: Path) -> dict:
    cfg = rdquant.CompressConfig(method=method, grid=f"gguf:{gtype}", embed_bits=16, calib_samples=args.calib_samples,
                                 calib_seqlen=args.calib_seqlen)
    t0 = time.perf_counter()
    art = rdquant.compress(args.model, cfg, progress=False).save(tmp / f"{method}-{gtype}")
    seconds = time.perf_counter() - t0
    out = rdquant.export(art, tmp / f"{method}-{gtype}.gguf", format="gguf")
    bits, types, nbytes = linear_types(out)
    worst = gguf_weight_error(out, rdquant.load(art, backend="cached"))
    return {"tool": "rdquant", "method": f"{method} --grid gguf:{gtype}", "type": gtype, "seconds": round(seconds, 1),
            "linear_bits": round(bits, 4), "linear_bytes": nbytes, "types": types, "ppl": round(score(out, args), 4),
            "exact_export": worst == 0.0}


def table(rows: list[dict]) -> str:
    lines = ["| type | tool | method | linear bits/weight | linear tensor types | WikiText-2 ppl | export = artifact | compress s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        types = ", ".join(f"{k} x{v}" for k, v in sorted(r["types"].items())) if r.get("types") else "-"
        exact = "-" if r.get("exact_export") is None else ("yes" if r["exact_export"] else "NO")
        lines.append(f"| {r['type']} | {r['tool']} | {r['method']} | {r['linear_bits']} | {types} | {r['ppl']:.3f} | {exact} | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", nargs="+", default=["Q4_K", "Q3_K", "Q2_K"], choices=["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--methods", nargs="+", default=["rtn", "gptq"], choices=["rtn", "gptq"])
    ap.add_argument("--llama-python", default=None, help="a python with llama-cpp-python: llama.cpp's own rows")
    ap.add_argument("--json", type=Path, default=RESULTS)
    ap.add_argument("--results", action="store_true", help="no run: print the table of --json")
    args = ap.parse_args()
    if args.results:
        if not args.json.is_file():
            raise SystemExit(f"{args.json} does not exist: run the benchmark first")
        print(table(json.loads(args.json.read_text())["rows"]))
        return
    tmp = Path(tempfile.mkdtemp(prefix="rdq-kquant-"))
    model, tok = load_any(args.model)
    rows = [{"tool": "original", "method": "float", "type": "-", "seconds": 0, "linear_bits": 16.0, "types": {},
             "ppl": round(rdquant.evaluate(model, tok, seqlen=args.seqlen, max_windows=args.windows, progress=False).ppl, 4),
             "exact_export": None}]
    del model
    for gtype in args.types:
        if args.llama_python:
            rows.append(llama_cpp_row(gtype, args, tmp))
        rows += [rdquant_row(gtype, m, args, tmp) for m in args.methods]
        print(table(rows), flush=True)
    command = "python bench/kquant.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "command": command, "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "protocol": f"WikiText-2 test, first {args.windows} windows x {args.seqlen}; calibration {args.calib_samples} x "
                    f"{args.calib_seqlen} C4; token embedding and head 16-bit in every file",
        "rows": rows}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
