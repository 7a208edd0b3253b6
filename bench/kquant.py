"""llama.cpp k-quants, solved by rdquant in their own grids (`--grid gguf:TYPE`) against llama.cpp's own quantizer
writing the same types (issue: export). For each type, three GGUF files whose decoder linears have the same
type tensor for tensor (the k-quant where rows are whole 256-weight super-blocks, the type's block-32
fallback elsewhere) and so the same bytes:

  llama.cpp      its quantizer, every tensor the type (`pure`), no imatrix (bench/peers/llamacpp_requant.py,
                 run with --llama-python), from the package GGUF the float model was dequantized from
  rdquant rtn    `--method rtn --grid gguf:TYPE`, exported to GGUF
  rdquant gptq   `--method gptq --grid gguf:TYPE`, exported to GGUF

and, with --mixes, llama.cpp's own mixes (Q4_K_M, ...: its per-tensor rules) beside rdquant's size-targeted mix
(`--method cvxq --grid gguf --target-size B`, B the linear bytes of llama.cpp's file).

Each file's linears (and token embedding) are read back with the gguf package and put into the float model,
which is scored on the first WikiText-2 windows; rdquant's rows also check that the export holds the
artifact's weights exactly. The single-type files keep the token embedding 16-bit (the comparison is the
linears'); the mixes keep it in Q8_0 as llama.cpp's mixes do on this model, so both files of a size have the
same bytes, and with --llama-windows both are also scored by llama.cpp itself.

    python bench/kquant.py --types Q4_K Q3_K Q2_K --windows 32 --llama-python /work/.cache/llama-venv/bin/python
    python bench/kquant.py --types --mixes Q4_K_M Q3_K_M Q2_K --windows 32 --llama-windows 8 \
        --llama-python /work/.cache/llama-venv/bin/python --json bench/results/kquant_mix.json
    python bench/kquant.py --results [--json FILE]   # a run's table
    python bench/kquant.py --tables bench/results/raw/kquant-DATE.json   # the results page's table
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

RESULTS = Path(__file__).parent / "results" / "raw" / f"kquant-{date.today().isoformat()}.json"
PAGE_TABLE = Path(__file__).parent / "results" / "kquant.json"
INTRO = ("Default model. Every row is a GGUF file scored after reading its tensors back with the `gguf` package into "
         "the float model (rdquant's evaluator, WikiText-2, first 32 x 2048 windows); the mix rows are also scored by "
         "llama.cpp itself (llama-cpp-python 0.3.36, built with GGML_NATIVE=OFF) on the first 4 windows. Single-type "
         "rows: every linear in the type (`pure` for llama.cpp), token embedding 16-bit, so the linears are the only "
         "difference; the same tensors get the same type in all three files, hence the same bytes. Mix rows: "
         "llama.cpp's own per-tensor rules for the file type, against rdquant's `cvxq --grid gguf` allocation at the "
         "same linear bytes; both keep the token embedding in Q8_0 (llama.cpp's choice here), so the files have the "
         "same size. Only ffn_down (1536 inputs) has rows of whole 256-weight super-blocks on this model; every other "
         "linear (576 inputs) takes a block-32 type (Q4_0, Q5_0, Q8_0), as llama.cpp falls back. The model's float "
         "weights were dequantized from a 4-bit block-32 (Q4_1) file, so block-32 grids of 4 bits and more, Q4_K "
         "included, nearly reproduce them for every tool: the 3- and 2-bit rows (Q3_K, Q2_K) are the telling ones. "
         "'export = artifact': the GGUF holds rdquant's weights bit for bit. In the run below rdquant's row at "
         "llama.cpp's Q2_K mix size was cut for time: that mix is Q3_K on ffn_down and Q4_0 elsewhere, the tensors of "
         "the Q3_K single-type rows (there with a 16-bit embedding). The '(tiny)' rows: llama.cpp running rdquant's "
         "k-quant exports of a tiny random llama whose rows are whole super-blocks (`--tiny`).")
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
    """WikiText-2 perplexity of the float model with its decoder linears (and token embedding) from the GGUF file
    at `path`, dequantized by the gguf package."""
    import gguf

    model, tok = load_any(args.model)
    with torch.no_grad():
        for name, W in gguf_linears(path, model.config).items():
            model.get_submodule(name).weight.copy_(W)
        emb = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "token_embd.weight")
        E = model.get_input_embeddings().weight
        E.copy_(torch.from_numpy(gguf.dequantize(emb.data, emb.tensor_type).reshape(E.shape).copy()))
    return rdquant.evaluate(model, tok, seqlen=args.seqlen, max_windows=args.windows, progress=False).ppl


def whole_file(path: Path, row: dict, args, tmp: Path) -> dict:
    """The file's size in bits per parameter (llama.cpp's basis) and, with --llama-windows, llama.cpp's own
    perplexity on the first windows (bench/llama_cpp_ppl.py)."""
    from export import llama_cpp_ppl

    from rdquant.loading import load_tokenizer

    model, tok = load_any(args.model)
    params = sum(p.numel() for p in model.parameters())  # tied embedding / head once
    row["file_bytes"] = path.stat().st_size
    row["file_bits_per_param"] = round(8 * path.stat().st_size / params, 4)
    if args.llama_windows:
        a = argparse.Namespace(seqlen=args.seqlen, windows=args.llama_windows)
        row["llama_cpp_ppl"] = round(llama_cpp_ppl(args.llama_python, path, tok, a, tmp), 4)
    return row


PURE = {"Q2_K": "Q2_K", "Q3_K": "Q3_K_S", "Q4_K": "Q4_K_S", "Q5_K": "Q5_K_S", "Q6_K": "Q6_K"}  # file type whose base is the k-quant


def llama_cpp_row(ftype: str, args, tmp: Path, pure: bool) -> dict:
    """llama.cpp's quantizer: one k-quant everywhere (`pure`, ftype a k-quant) or a file type's own mix."""
    from rdquant.models import alias_gguf

    out = tmp / f"llamacpp-{ftype}{'-pure' if pure else ''}.gguf"
    res = subprocess.run([args.llama_python, str(Path(__file__).parent / "peers" / "llamacpp_requant.py"),
                          str(alias_gguf(args.model)), str(out), PURE[ftype] if pure else ftype,
                          "--threads", str(torch.get_num_threads())] + (["--pure"] if pure else ["--own-vocab"]),
                         capture_output=True, text=True, check=True)
    info = json.loads(res.stdout.strip().splitlines()[-1])
    bits, types, nbytes = linear_types(out)
    how = "pure" if pure else "its mix"
    row = {"tool": "llama.cpp", "method": f"quantize ({how}, no imatrix), llama-cpp-python {info['version']}",
           "type": ftype if pure else f"{ftype} mix",
           "seconds": round(info["wall_s"], 1), "linear_bits": round(bits, 4), "linear_bytes": nbytes, "types": types,
           "ppl": round(score(out, args), 4), "exact_export": None}
    return row if pure else whole_file(out, row, args, tmp)


def mix_row(ftype: str, linear_bytes: int, args, tmp: Path) -> dict:
    """rdquant's size-targeted GGUF mix (cvxq --grid gguf) at the linear bytes of llama.cpp's `ftype` mix, the
    token embedding in Q8_0 as llama.cpp's mixes keep it here: the same file size."""
    cfg = rdquant.CompressConfig(method="cvxq", grid="gguf", target_size=linear_bytes, embed_bits=8,
                                 calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen)
    return rdquant_row(f"{ftype} mix", cfg, f"cvxq --grid gguf --target-size {linear_bytes}", args, tmp, whole=True)


def type_row(gtype: str, method: str, args, tmp: Path) -> dict:
    """rdquant solving in one k-quant's grid (`--grid gguf:TYPE`)."""
    cfg = rdquant.CompressConfig(method=method, grid=f"gguf:{gtype}", embed_bits=16, calib_samples=args.calib_samples,
                                 calib_seqlen=args.calib_seqlen)
    return rdquant_row(gtype, cfg, f"{method} --grid gguf:{gtype}", args, tmp)


def rdquant_row(gtype: str, cfg, label: str, args, tmp: Path, whole: bool = False) -> dict:
    """Compress, save, export to GGUF, check the export against the artifact and score the GGUF's linears."""
    name = label.replace(" ", "_").replace("-", "").replace(":", "")
    t0 = time.perf_counter()
    art = rdquant.compress(args.model, cfg, progress=False).save(tmp / name)
    seconds = time.perf_counter() - t0
    out = rdquant.export(art, tmp / f"{name}.gguf", format="gguf")
    bits, types, nbytes = linear_types(out)
    worst = gguf_weight_error(out, rdquant.load(art, backend="cached"))
    row = {"tool": "rdquant", "method": label, "type": gtype, "seconds": round(seconds, 1),
            "linear_bits": round(bits, 4), "linear_bytes": nbytes, "types": types, "ppl": round(score(out, args), 4),
            "exact_export": worst == 0.0}
    return whole_file(out, row, args, tmp) if whole else row


def table(rows: list[dict]) -> str:
    lines = ["| type | tool | method | linear bits/weight | linear tensor types | ppl (rdquant's evaluator) | export = artifact "
             "| compress s | file bits/param | ppl in llama.cpp |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        types = ", ".join(f"{k} x{v}" for k, v in sorted(r["types"].items())) if r.get("types") else "-"
        exact = "-" if r.get("exact_export") is None else ("yes" if r["exact_export"] else "NO")
        lines.append(f"| {r['type']} | {r['tool']} | {r['method']} | {r['linear_bits']} | {types} | {r['ppl']:.3f} | {exact} | "
                     f"{'-' if r['seconds'] is None else format(r['seconds'], '.0f')} | {r.get('file_bits_per_param', '-')} | "
                     f"{r.get('llama_cpp_ppl', '-')} |")
    return "\n".join(lines)


def tiny_rows(args, tmp: Path) -> list[dict]:
    """llama.cpp itself on rdquant's k-quant exports of a tiny random llama whose rows are whole super-blocks
    (hidden 256, MLP 512; every linear in the type, embedding and head Q8_0): its perplexity on random token
    windows beside rdquant's on the same tokens (llama.cpp computes its dot products on 8-bit activations)."""
    import math

    import numpy as np

    from rdquant.testing import save_tiny_model_dir

    d = save_tiny_model_dir(tmp / "wide-llama", "llama", hidden=256, intermediate=512, layers=2)
    windows = torch.randint(0, 400, (4, 128), generator=torch.Generator().manual_seed(0))
    np.save(tmp / "tiny-windows.npy", windows.numpy().astype(np.int32))
    rows = []
    for t in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"):
        cfg = rdquant.CompressConfig(grid=f"gguf:{t}", calib_samples=8, calib_seqlen=64)
        art = rdquant.compress(str(d), cfg, progress=False).save(tmp / f"tiny-{t}")
        out = rdquant.export(art, tmp / f"tiny-{t}.gguf", format="gguf")
        model = rdquant.load(art, backend="reference")
        with torch.no_grad():
            logits = model(windows).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
        res = subprocess.run([args.llama_python, str(Path(__file__).parent / "llama_cpp_ppl.py"), str(out),
                              str(tmp / "tiny-windows.npy")], capture_output=True, text=True, check=True)
        got = json.loads(res.stdout.strip().splitlines()[-1])
        theirs, first = got["ppl"], torch.tensor(got["first_logits"])  # window 0's first 8 positions x 8 logits
        ours = logits[0, :8, :8].double()
        rel = float((first - ours).abs().max() / ours.abs().max())
        bits, types, nbytes = linear_types(out)
        rows.append({"tool": "llama.cpp", "method": "runs rdquant's gptq --grid gguf export (tiny random llama, 256-wide, "
                     "4 x 128 random tokens)", "type": f"{t} (tiny)", "seconds": None, "linear_bits": round(bits, 4),
                     "linear_bytes": nbytes, "types": types, "ppl": round(math.exp(float(nll)), 4),
                     "llama_cpp_ppl": round(theirs, 4), "exact_export": gguf_weight_error(out, model) == 0.0,
                     "logits_rel_err": round(rel, 5), "tiny": True})
    return rows


def write_table(run: Path) -> None:
    """bench/results/kquant.json (the results page's table) from one run's JSON (kept in bench/results/raw/)."""
    result = json.loads(run.read_text())
    common = {"command": result["command"], "source": f"bench/results/raw/{run.name}", "date": result["date"],
              "machine": result["machine"]}
    rows = [{**r, **common, "command": r.get("command", result["command"]),
             "types": ", ".join(f"{k} x{v}" for k, v in sorted(r["types"].items())) or None} for r in result["rows"]]
    cols = [["type", "file type"], ["tool", "tool"], ["method", "method"], ["linear_bits", "linear bits/weight", ".4f"],
            ["types", "linear tensor types"], ["ppl", "ppl (32 windows)", ".3f"], ["file_bits_per_param",
            "file bits/param", ".3f"], ["llama_cpp_ppl", "llama.cpp ppl (4 windows)", ".3f"],
            ["exact_export", "export = artifact"], ["logits_rel_err", "llama.cpp logits vs rdquant (max rel)", ".1e"],
            ["seconds", "compress s", ".0f"]]
    PAGE_TABLE.write_text(json.dumps(
        {"title": "GGUF: llama.cpp's k-quants and mixes", "question": "At the same GGUF types and file size, does "
         "rdquant's GGUF (GPTQ solved in the types' own grids, CVXQ's size-targeted mix) beat llama.cpp's own "
         "quantizer?", "intro": INTRO, "columns": cols, "rows": rows}, indent=1) + "\n")
    print(f"wrote {PAGE_TABLE}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", nargs="*", default=["Q4_K", "Q3_K", "Q2_K"], choices=["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--methods", nargs="+", default=["rtn", "gptq"], choices=["rtn", "gptq"])
    ap.add_argument("--mixes", nargs="*", default=[], choices=["Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M"],
                    help="llama.cpp's own mixes, each beside rdquant's cvxq --grid gguf mix of the same linear bytes")
    ap.add_argument("--llama-python", default=None, help="a python with llama-cpp-python: llama.cpp's own rows")
    ap.add_argument("--llama-windows", type=int, default=0,
                    help="with --mixes: score both files of each size in llama.cpp too, on this many windows (~30 s per window "
                         "on 2 cores)")
    ap.add_argument("--json", type=Path, default=RESULTS)
    ap.add_argument("--results", action="store_true", help="no run: print the table of --json")
    ap.add_argument("--tiny", action="store_true", help="only llama.cpp's perplexity on rdquant's k-quant exports of a "
                    "tiny 256-wide llama, added to --json")
    ap.add_argument("--tables", type=Path, default=None, help="no run: write the results page's table from this run's JSON")
    args = ap.parse_args()
    if args.tables is not None:
        if not args.tables.is_file():
            raise SystemExit(f"{args.tables} does not exist: run the benchmark first")
        write_table(args.tables)
        return
    if args.results:
        if not args.json.is_file():
            raise SystemExit(f"{args.json} does not exist: run the benchmark first")
        print(table(json.loads(args.json.read_text())["rows"]))
        return
    tmp = Path(tempfile.mkdtemp(prefix="rdq-kquant-"))
    if args.tiny:
        rows: list[dict] = []
    else:
        model, tok = load_any(args.model)
        rows = [{"tool": "original", "method": "float", "type": "-", "seconds": 0, "linear_bits": 16.0, "types": {},
                 "ppl": round(rdquant.evaluate(model, tok, seqlen=args.seqlen, max_windows=args.windows, progress=False).ppl, 4),
                 "exact_export": None}]
        del model
    if args.mixes and not args.llama_python:
        raise SystemExit("--mixes needs --llama-python (llama.cpp's mix sets the size)")
    command = "python bench/kquant.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    args.json.parent.mkdir(parents=True, exist_ok=True)

    def publish() -> None:  # after every row: a long run that stops keeps what it measured
        for r in rows:  # each row keeps the command that measured it (a --tiny run adds rows to a file)
            r.setdefault("command", command)
        print(table(rows), flush=True)
        args.json.write_text(json.dumps({
            "command": command, "date": date.today().isoformat(),
            "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
            "protocol": f"WikiText-2 test, first {args.windows} windows x {args.seqlen} (llama.cpp's own: the first "
                        f"{args.llama_windows}); calibration {args.calib_samples} x {args.calib_seqlen} C4; token "
                        "embedding 16-bit in the single-type files, Q8_0 in the mixes (as llama.cpp's mixes keep it here)",
            "rows": rows}, indent=1))

    if args.tiny:  # llama.cpp on the tiny model's exports, added to (or replacing those rows in) --json
        if not args.llama_python:
            raise SystemExit("--tiny needs --llama-python")
        if args.json.is_file():  # the file's other rows keep the command that measured them
            before = json.loads(args.json.read_text())
            rows = [{**r, "command": r.get("command", before["command"])} for r in before["rows"] if not r.get("tiny")]
        rows += tiny_rows(args, tmp)
        publish()
        return
    for gtype in args.types:
        if args.llama_python:
            rows.append(llama_cpp_row(gtype, args, tmp, pure=True))
            publish()
        for m in args.methods:
            rows.append(type_row(gtype, m, args, tmp))
            publish()
    for ftype in args.mixes:  # llama.cpp's own mixes against rdquant's at the same linear bytes
        peer = llama_cpp_row(ftype, args, tmp, pure=False)
        rows.append(peer)
        publish()
        rows.append(mix_row(ftype, peer["linear_bytes"], args, tmp))
        publish()
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
