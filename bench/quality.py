"""Side-by-side quality / size / speed table on the default model (the foundation benchmark).

    python bench/quality.py                       # everything: original, RTN, GPTQ, llm-compressor GPTQ
    python bench/quality.py --bits 3 --methods gptq
    python bench/quality.py --bits 3 --methods gptq --fresh --results   # and publish: bench/results/, BENCHMARKS.md

Protocol: WikiText-2 test, seqlen 2048, the first --windows windows; calibration 128 x 512 tokens of
the C4 sample in ../shared/data/c4 (seed 0), the same windows for every method; group 64, asymmetric.
rdquant rows evaluate the *loaded artifact* and check it is bit-identical to the in-memory model.
Peer (llm-compressor) runs are cached in bench/cache/ (they do not change between rdquant versions);
--rerun-peers runs them again. Rows are also cached per configuration; --fresh recomputes ours.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import rdquant
from rdquant.data import calibration_windows, shared_data_dir
from rdquant.models import load_model, resolve_model
from rdquant.coding import recode
from rdquant.runtime import QuantLinear

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / "cache"
PEER_PY = ROOT / ".venv-bench" / "bin" / "python"


def calib_file(tok, n: int, seqlen: int, seed: int, prefix: str = "") -> Path:
    """The cached calibration windows; `prefix` keeps another tokenizer's windows apart."""
    path = CACHE / f"{prefix}calib_c4_{n}x{seqlen}_seed{seed}.safetensors"
    if not path.is_file():
        ids = calibration_windows(tok, shared_data_dir() / "c4" / "c4_calib_1k.jsonl", n, seqlen, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"input_ids": ids}, path)
    return path


MEASURED: list[dict] = []  # rows computed in this run (not read from the cache): what --results may publish


def cached_row(name: str, fresh: bool, compute, cached_only: bool = False):
    path = CACHE / "rows" / f"{name}.json"
    if path.is_file() and not fresh:
        return json.loads(path.read_text())
    if cached_only:
        print(f"(no cached row {name}: skipped)")
        return None
    row = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row, indent=1))
    MEASURED.append(row)
    return row


def provenance(script: str) -> dict:
    """The command line, machine and date of this run, for a row measured now."""
    import platform
    import shlex
    from datetime import date

    return {"command": f"python bench/{script} " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, PyTorch {torch.__version__}",
            "date": date.today().isoformat()}


def publish_rows(results: Path, rows: list[dict], key, script: str, stamped: bool = False) -> None:
    """Put rows into a results file, replacing a published row of the same `key(row)`, then regenerate
    the results page: this run's measured rows (those in MEASURED) with this run's command line, date
    and machine, or (`stamped`) every row that recorded its own when it was measured (`provenance`)."""
    measured = [r for r in rows if "command" in r] if stamped else [r for r in rows if any(r is m for m in MEASURED)]
    if not measured:
        print("--results: nothing measured in this run (cached rows are not published)")
        return
    page = json.loads(results.read_text())
    keep = {key(r) for r in measured}
    page["rows"] = [r for r in page["rows"] if key(r) not in keep]
    for r in measured:
        page["rows"].append({**r, **({} if stamped else provenance(script)), "source": f"bench/{script} --results"})
    results.write_text(json.dumps(page, indent=1, ensure_ascii=False) + "\n")
    subprocess.run([sys.executable, str(ROOT / "bench" / "results_page.py")], check=True)


def eval_row(model, tok, args) -> dict:
    r = rdquant.evaluate(model, tok, seqlen=args.seqlen, max_windows=args.windows, device=args.device)
    return {"ppl": r.ppl, "tokens": r.tokens, "eval_seconds": r.seconds}


def _number(v: str):
    """A value for a field whose default is None (target_bits, target_size, ...): a number if it reads as one."""
    for kind in (int, float):
        try:
            return kind(v)
        except ValueError:
            pass
    return v


def _typed(pairs: list[str]) -> dict:
    """KEY=VALUE strings -> CompressConfig fields of the right type."""
    out = {}
    for k, v in (kv.split("=", 1) for kv in pairs):
        default = getattr(rdquant.CompressConfig, k)
        out[k] = v.lower() in ("1", "true", "yes") if isinstance(default, bool) else type(default)(v) if default is not None else _number(v)
    return out


def _tag(typed: dict, prefix: str = "") -> str:
    """Name suffix of the extra config fields of a row (artifact and cache names)."""
    return "".join(f"_{k.removeprefix(prefix)}{v}" for k, v in sorted(typed.items()))


def _scales_label(bits: int) -> str:
    return f" (scales: {bits} mantissa bits)" if bits != 10 else ""


def rdquant_job(method: str, setting, args) -> tuple[str, rdquant.CompressConfig]:
    """(artifact name, config) of one rdquant row. setting: the bit width; ecsq: target coded bits;
    claq: target all-in bits per weight; cvxq: (target bits, solver); uniform: (bits, group) of GPTQ."""
    # the page's protocol compares decoder linears: embedding and head stay 16-bit unless a row's extras
    # say otherwise (bench/whole_file.py compares whole files)
    dev = dict(device=args.device, embed_bits=16)
    if method == "ecsq":
        return (f"ecsq_c{setting}g{args.ecsq_group_size}",
                rdquant.CompressConfig(method=method, target_coded_bits=setting, group_size=args.ecsq_group_size, **dev))
    if method == "claq":
        typed = _typed(args.claq_extra)
        tag = _tag(typed, "claq_")
        return f"claq_t{setting}{tag}", rdquant.CompressConfig(method="claq", target_bits=setting, **{**dev, **typed})
    if method == "cvxq":
        target, solver = setting
        typed = _typed(args.cvxq_extra)
        tag = _tag(typed, "cvxq_")
        group = args.group_size if solver == "claq" else args.cvxq_group_size or args.group_size  # claq: column cells
        return (f"cvxq_{solver}_t{target}g{group}{tag}",
                rdquant.CompressConfig(method="cvxq", target_bits=target, cvxq_solver=solver, group_size=group,
                                       cvxq_cluster_rows=group, **{**dev, **typed}))
    if method == "uniform":
        bits, group = setting
        return f"gptq_w{bits}g{group}", rdquant.CompressConfig(method="gptq", bits=bits, group_size=group, **dev)
    typed = _typed(args.gptq_extra) if method in ("gptq", "rtn") else {}
    return (f"{method}_w{int(setting)}g{args.group_size}{_tag(typed)}",
            rdquant.CompressConfig(method=method, bits=int(setting), group_size=args.group_size, **{**dev, **typed}))


def run_rdquant(name: str, cfg: rdquant.CompressConfig, args, calib: Path) -> dict:
    model, tok, mid = load_model(args.model)
    ids = load_file(calib)["input_ids"]
    t0 = time.perf_counter()
    cm = rdquant.compress(model, cfg, tokenizer=tok, calib_ids=ids, model_id=mid)
    seconds = time.perf_counter() - t0
    plan_seconds = getattr(cm.method_state, "seconds", None) if cfg.method == "cvxq" else None
    cm.model.to("cpu")
    out = cm.save(CACHE / "artifacts" / name, overwrite=True)
    loaded = rdquant.load(out, cache_dequantized=True)
    exact = all(
        torch.equal(m.dequantized_weight(), loaded.get_submodule(n).dequantized_weight())
        for n, m in cm.model.named_modules()
        if isinstance(m, QuantLinear)
    )
    x = torch.arange(256).unsqueeze(0) * 7 % 1000
    with torch.no_grad():
        exact = exact and torch.equal(cm.model(x).logits, loaded(x).logits)
    del cm, model
    method = cfg.method
    if method == "cvxq":
        method = f"cvxq+{cfg.cvxq_solver}" + ("" if cfg.cvxq_sensitivity == "gradient" else f" ({cfg.cvxq_sensitivity} sensitivity)")
        method += " +bias corr." if cfg.bias_correction else ""
        method += " (grid κ)" if cfg.cvxq_kappa == "grid" else ""
        method += " (row-group cells)" if cfg.cvxq_cells == "group" and cfg.cvxq_solver != "claq" else ""
        method += " (companded grid)" if cfg.cvxq_grid == "laplace" else ""
        method += " (coded rate)" if cfg.cvxq_rate == "coded" else ""
        method += f" (min width {cfg.cvxq_min_bits})" if cfg.cvxq_min_bits >= 0 and cfg.cvxq_min_bits != (0 if cfg.cvxq_solver == "claq" else 2) else ""
    method += _scales_label(cfg.scale_bits)
    row = {"tool": "rdquant", "method": method, "bits": cfg.target_bits or cfg.target_coded_bits or cfg.bits,
           "group_size": f"col/{cfg.claq_share}" if "claq" in (cfg.method, method.removeprefix("cvxq+")[:4]) else cfg.group_size,
           "device": args.device, **size_fields(out), "compress_seconds": seconds, "exact_reload": exact,
           **({"allocation_seconds": plan_seconds} if plan_seconds is not None else {}),
           "threads": torch.get_num_threads(), "name": name, "calib_seed": args.calib_seed,
           **({"policy": cfg.claq_policy} if cfg.method == "claq" and cfg.claq_policy != "rd" else {})}
    row.update(eval_row(loaded, tok, args))
    return row


def size_fields(out: Path) -> dict:
    """Sizes of a saved artifact for its row: all-in bits/weight packed and ANS-coded, bytes, the split."""
    rep = rdquant.inspect(out)
    coded = rdquant.inspect(recode(out, CACHE / "coded" / f"{out.name}-ans", codec="ans", overwrite=True))
    return {"bits_per_weight": rep.bits_per_weight, "coded_bits_per_weight": coded.coded_bits_per_weight,
            "quantized_bytes": rep.quantized_bytes, "disk_bytes": rep.total_bytes, "split_bits": rep.split_bits()}


def run_artifact(path: Path, args) -> dict:
    """A row for a saved artifact (e.g. one tuned on another machine by bench/tune_remote.py)."""
    from rdquant.artifact import read_manifest
    from rdquant.loading import load_tokenizer

    man = read_manifest(path)
    rec, tun = man["recipe"], man.get("tuning")
    method = rec["method"] + (f" + tuning ({tun['steps']} steps, lr {tun['lr']:g})" if tun else "")
    method += _scales_label(rec.get("scale_bits", 10))
    row = {"tool": "rdquant", "method": method, "bits": rec.get("target_bits") or rec["bits"],
           "group_size": f"col/{rec['claq_share']}" if rec["method"] == "claq" else rec["group_size"],
           **size_fields(path), "compress_seconds": man.get("compress_seconds"), "exact_reload": None, "name": path.name,
           **({"tuning": tun} if tun else {})}
    row.update(eval_row(rdquant.load(path, cache_dequantized=True), load_tokenizer(path), args))
    return row


PEERS = {
    # kind: (runner, cache dir of a setting, runner arguments of a setting, label of a setting)
    "llmcompressor": ("llmcompressor_gptq.py", lambda b, a: f"llmcompressor_w{b}g{a.group_size}",
                      lambda b, a, calib: ["--calib", str(calib), "--bits", str(b), "--group-size", str(a.group_size)]),
    "hqq": ("hqq_quant.py", lambda b, a: f"hqq_w{b}g{a.group_size}",
            lambda b, a, calib: ["--bits", str(b), "--group-size", str(a.group_size)]),
    "llamacpp": ("llamacpp_quant.py", lambda b, a: f"llamacpp_{LLAMACPP_FTYPE[b]}",
                 lambda b, a, calib: ["--ftype", LLAMACPP_FTYPE[b]]),
}
LLAMACPP_FTYPE = {4: "Q4_K_M", 3: "Q3_K_M", 2: "Q2_K"}


def run_peer(kind: str, bits: int, args, calib: Path) -> dict:
    """A third-party quantizer's row: run it in its venv (bench/peers/README.md) unless cached, then
    load its dequantized weights into the float model and evaluate with the same protocol."""
    runner, dirname, extra = PEERS[kind]
    out = CACHE / dirname(bits, args)
    result = out / "result.json"
    if args.rerun_peers or not result.is_file():
        if not PEER_PY.is_file():
            raise SystemExit(f"{kind} needs its venv: see bench/peers/README.md")
        src = resolve_model(args.model)
        cmd = [str(PEER_PY), str(ROOT / "bench" / "peers" / runner), "--model", str(src.path), "--out", str(out),
               "--threads", str(torch.get_num_threads()), *extra(bits, args, calib)]
        subprocess.run(cmd, check=True)
    peer = json.loads(result.read_text())
    model, tok, _ = load_model(args.model)
    deq = load_file(out / "dequantized.safetensors")
    with torch.no_grad():
        for name, w in deq.items():
            model.get_parameter(name).copy_(w)
    row = {"tool": {"llmcompressor": "llm-compressor", "hqq": "hqq", "llamacpp": "llama.cpp"}[kind],
           "method": {"llmcompressor": "gptq", "hqq": "hqq", "llamacpp": peer.get("ftype", "")}[kind],
           "bits": bits, "group_size": args.group_size if kind != "llamacpp" else "k-quant",
           "bits_per_weight": 8 * peer["quantized_linear_bytes"] / peer["n_quantized_params"],
           "quantized_bytes": peer["quantized_linear_bytes"], "disk_bytes": peer.get("compressed_bytes", peer.get("quantized_gguf_file_bytes")),
           "compress_seconds": peer["wall_time_s"], "exact_reload": None, "threads": peer.get("threads"),
           "version": peer.get("version"), "actorder": peer.get("actorder")}
    row.update(eval_row(model, tok, args))
    return row


def _method(r: dict) -> str:
    return (r["method"] + (f" ({r['policy']} policy)" if r.get("policy") else "")
            + (f" [{r['device']}]" if r.get("device", "cpu") != "cpu" else ""))


def table(rows: list[dict], args) -> str:
    tokens = next((r["tokens"] for r in rows if "tokens" in r), 0)
    head = (f"WikiText-2 test, first {args.windows} windows x {args.seqlen} = {tokens:,} tokens; "
            f"group {args.group_size}, asymmetric; calibration {args.calib_samples} x {args.calib_seqlen} C4 tokens\n\n")
    lines = ["| tool | method | bits | group | ppl | bits/weight (all-in) | coded bits/weight (ANS) | quantized-linear bytes | bytes on disk | compress s | threads | reload exact |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fmt = lambda v, f: "-" if v is None else format(v, f)
        lines.append(
            f"| {r['tool']} | {_method(r)} | {r.get('bits', '-')} | {r.get('group_size', '-')} | {r['ppl']:.3f} | {fmt(r.get('bits_per_weight'), '.3f')} | "
            f"{fmt(r.get('coded_bits_per_weight'), '.3f')} | "
            f"{fmt(r.get('quantized_bytes'), ',')} | {fmt(r.get('disk_bytes'), ',')} | {fmt(r.get('compress_seconds'), '.0f')}{'' if r.get('allocation_seconds') is None else ' (alloc ' + format(r['allocation_seconds'], '.0f') + ')'} | "
            f"{r.get('threads', '-')} | {'-' if r.get('exact_reload') is None else ('yes' if r['exact_reload'] else 'NO')} |"
        )
    return head + "\n".join(lines)


RESULTS = ROOT / "bench" / "results" / "accuracy.json"
# the results page's protocol (bench/results/accuracy.json's intro): --results refuses any other
PAGE_PROTOCOL = {"model": "smollm2-135m", "windows": 32, "seqlen": 2048, "calib_samples": 128, "calib_seqlen": 512,
                 "calib_seed": 0}


def quality_row(r: dict) -> str:
    """A row's configuration as this script labels it: what --results matches published rows by."""
    method = r["method"] + (f" ({r['policy']} policy)" if r.get("policy") else "")
    return f"{r['tool']} | {method} | {r.get('bits', '-')} | {r.get('group_size', '-')}"


def _setting(r: dict) -> str:
    bits, group = r.get("bits"), r.get("group_size")
    if r["tool"] == "original":
        return "-"
    if r["tool"] == "llama.cpp":
        return "no imatrix"
    if r["tool"] != "rdquant" or r["method"].split()[0] in ("gptq", "rtn"):
        return f"{bits}-bit " + ("per row" if group == -1 else f"g{group}")
    return f"target {bits}" + (" coded" if r["method"].startswith("ecsq") else "")


def add_to_results(rows: list[dict], args) -> None:
    """Put the rows measured in this run into bench/results/accuracy.json (the results page's source) in
    its schema, each with this run's exact command line, date and machine. A published row of the same
    configuration (quality_row) keeps its labels and gets the new figures; other rows are appended.
    Rows read from the cache are left out: their date and machine are not recorded."""
    import os
    import platform
    import shlex
    import sys
    from datetime import date

    measured = [r for r in rows if any(r is m for m in MEASURED) and r.get("ppl") is not None]
    skipped = sum(1 for r in rows if not any(r is m for m in MEASURED))
    if skipped:
        print(f"--results: {skipped} rows came from bench/cache and are not published (their date and machine "
              "are not recorded); --fresh / --rerun-peers measure them again")
    if not measured:
        return
    command = "python bench/quality.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if args.device.startswith("cuda"):
        machine = f"{torch.cuda.get_device_name()}, PyTorch {torch.__version__}"
    else:
        machine = (f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, "
                   f"{torch.get_num_threads()} threads, PyTorch {torch.__version__}")
    page = json.loads(RESULTS.read_text())
    published = {r.get("quality_row"): r for r in page["rows"] if r.get("quality_row")}
    for r in measured:
        key = quality_row(r)
        nbytes = r.get("quantized_bytes")
        figures = {"bits_per_weight": 16 if r["tool"] == "original" else r.get("bits_per_weight"),
                   "linear_bytes": nbytes, "linear_mb": None if nbytes is None else round(nbytes / 1e6, 2),
                   "coded_bits_per_weight": r.get("coded_bits_per_weight"), "ppl": r["ppl"], "machine": machine,
                   "date": date.today().isoformat(), "command": command,
                   "source": "bench/quality.py --results", "quality_row": key}
        if key in published:
            published[key].pop("date_source", None)
            published[key].update(figures)
        else:
            page["rows"].append({"tool": r["tool"], "method": r["method"], "setting": _setting(r), **figures})
            print(f"--results: new row {key!r}: check its labels in {RESULTS}")
    RESULTS.write_text(json.dumps(page, indent=1, ensure_ascii=False) + "\n")
    print(f"{len(measured)} rows in {RESULTS}")
    subprocess.run([sys.executable, str(ROOT / "bench" / "results_page.py")], check=True)  # the page follows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    ap.add_argument("--methods", nargs="+", default=["rtn", "gptq", "llmcompressor"],
                    help="rdquant: rtn gptq ecsq claq cvxq uniform; peers: llmcompressor hqq llamacpp")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--calib-seed", type=int, default=0,
                    help="which C4 windows calibrate (another seed: how much a row moves with its calibration)")
    ap.add_argument("--ecsq-targets", type=float, nargs="+", default=[3.0, 2.5],
                    help="coded bits/weight targets for --methods ecsq")
    ap.add_argument("--ecsq-group-size", type=int, default=128)
    ap.add_argument("--claq-targets", type=float, nargs="+", default=[4.1, 3.1, 2.2],
                    help="all-in bits/weight targets for --methods claq")
    ap.add_argument("--claq-extra", nargs="*", default=[], metavar="KEY=VALUE",
                    help="more CompressConfig fields for claq rows, e.g. claq_outlier_frac=0.002")
    ap.add_argument("--gptq-extra", nargs="*", default=[], metavar="KEY=VALUE",
                    help="CompressConfig fields for the gptq / rtn rows, e.g. scale_bits=7")
    ap.add_argument("--cvxq-targets", type=float, nargs="+", default=[4.0, 3.5, 3.0, 2.5],
                    help="all-in bits/weight targets for --methods cvxq")
    ap.add_argument("--cvxq-solvers", nargs="+", default=["gptq", "rtn"], help="cvxq rows: gptq rtn claq")
    ap.add_argument("--cvxq-group-size", type=int, default=None,
                    help="group size of the gptq/rtn cvxq rows (cluster cells: rows per cluster); default --group-size")
    ap.add_argument("--cvxq-extra", nargs="*", default=[], metavar="KEY=VALUE",
                    help="more CompressConfig fields for cvxq rows, e.g. cvxq_sensitivity=hessian")
    ap.add_argument("--uniform", nargs="+", default=["4:-1", "3:38", "3:-1", "2:36"], metavar="BITS:GROUP",
                    help="uniform GPTQ rows at these widths and group sizes (--methods uniform), to match sizes")
    ap.add_argument("--artifacts", type=Path, nargs="*", default=[],
                    help="also rows for these saved artifacts (evaluated as they are, e.g. tuned by bench/tune_remote.py)")
    ap.add_argument("--device", default="cpu", help="compress and evaluate on this device")
    ap.add_argument("--with-device-rows", nargs="*", default=[], metavar="DEVICE",
                    help="with --cached-only: rows missing on this device are taken from these (e.g. cuda)")
    ap.add_argument("--plot", type=Path, default=ROOT / "bench" / "plots" / "ppl_vs_bits.png",
                    help="perplexity vs all-in bits/weight of every row (log y); '' = no plot")
    ap.add_argument("--fresh", action="store_true", help="recompute cached rdquant rows")
    ap.add_argument("--rerun-peers", action="store_true", help="run the peers again instead of their cache")
    ap.add_argument("--cached-only", action="store_true", help="print the table of cached rows; run nothing")
    ap.add_argument("--json", type=Path, default=CACHE / "quality.json")
    ap.add_argument("--results", action="store_true",
                    help="also put the rows measured in this run into bench/results/accuracy.json (the results "
                         "page's source) with this command line, date and machine, and "
                         "regenerate BENCHMARKS.md (bench/results_page.py)")
    args = ap.parse_args()
    if args.results and any(getattr(args, k) != v for k, v in PAGE_PROTOCOL.items()):
        raise SystemExit(f"--results publishes only rows measured with the results page's protocol {PAGE_PROTOCOL}")
    if shared_data_dir() is None:
        raise SystemExit("needs ../shared/data (WikiText-2 and the C4 sample)")

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model(args.model).path)
    calib = calib_file(tok, args.calib_samples, args.calib_seqlen, args.calib_seed)
    tag = f"w{args.windows}s{args.seqlen}c{args.calib_samples}x{args.calib_seqlen}g{args.group_size}"
    rows = [cached_row(f"original_{args.model}_{tag}", False,
                       lambda: {"tool": "original", "method": "fp32 (16-bit on disk)",
                                **eval_row(*load_model(args.model)[:2], args)})]
    tag += f"_seed{args.calib_seed}" if args.calib_seed else ""  # the original's row does not calibrate
    jobs = [(m, b) for b in args.bits for m in args.methods if m not in ("ecsq", "claq", "cvxq", "uniform")]
    jobs += [("ecsq", t) for t in args.ecsq_targets if "ecsq" in args.methods]
    jobs += [("claq", t) for t in args.claq_targets if "claq" in args.methods]
    jobs += [("uniform", tuple(int(x) for x in u.split(":"))) for u in args.uniform if "uniform" in args.methods]
    jobs += [("cvxq", (t, s)) for t in args.cvxq_targets for s in args.cvxq_solvers if "cvxq" in args.methods]
    jobs += [("artifact", p) for p in args.artifacts]
    for method, bits in jobs:
        if method == "artifact":  # `bits` is the artifact's path
            row = cached_row(f"artifact_{bits.name}_{tag}", args.fresh, lambda: run_artifact(bits, args), args.cached_only)
        elif method in PEERS:
            row = cached_row(f"{method}_w{bits}_{tag}", args.rerun_peers, lambda: run_peer(method, bits, args, calib),
                             args.cached_only)
        else:
            name, cfg = rdquant_job(method, bits, args)
            extra = _tag(_typed(args.gptq_extra)) if method in ("gptq", "rtn") else ""
            row_name = (f"{method}_w{bits}{extra}_{tag}" if method not in ("ecsq", "claq", "cvxq", "uniform")
                        else f"{name}_{tag}")
            row_name += "" if args.device == "cpu" else f"_{args.device.replace(':', '')}"
            row = cached_row(f"{row_name}_v{rdquant.__version__}", args.fresh,
                             lambda: run_rdquant(name, cfg, args, calib), args.cached_only)
            for dev in args.with_device_rows if row is None else ():  # rows measured on a GPU machine
                row = cached_row(f"{row_name}_{dev}_v{rdquant.__version__}", False, None, True)
                if row is not None:
                    row["device"] = dev
                    break
        if row is not None:
            rows.append(row)
        print(table(rows, args), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=1))
    if args.results:
        add_to_results(rows, args)
    print("\n" + table(rows, args))
    if str(args.plot) not in ("", "."):
        plot(rows, args.plot)
        print(f"\nplot: {args.plot}")


def plot(rows: list[dict], path: Path) -> None:
    """Perplexity (log scale) against all-in bits per weight, one marker/line per tool+method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next((r for r in rows if r["tool"] == "original"), None)
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r.get("bits_per_weight") is None:
            continue
        key = "llama.cpp (Q2_K, Q3_K_M, Q4_K_M)" if r["tool"] == "llama.cpp" else f"{r['tool']} {_method(r)}"
        series.setdefault(key, []).append((r["bits_per_weight"], r["ppl"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    if base is not None:
        ax.axhline(base["ppl"], color="gray", ls="--", lw=1, label=f"original ({base['ppl']:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("all-in bits per quantized weight")
    ax.set_ylabel("WikiText-2 perplexity (log)")
    ax.set_title("SmolLM2-135M: perplexity vs size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
