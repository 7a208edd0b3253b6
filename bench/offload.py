"""Memory-limited inference: tokens/s of greedy decoding when the weights do not fit the memory budget,
rdquant streaming its blocks (`load(..., max_memory=)`) against transformers + accelerate's disk offload.

    python bench/offload.py                    # the full table (~25 min on 2 cores), JSON + plot
    python bench/offload.py --budgets 50 --bandwidths 1 --variants packed coded   # a slice

Variants: `accelerate-fp16` (the original model in float16, `device_map="auto"`, `max_memory={"cpu": B}`,
`offload_folder`: what a transformers user does today), rdquant `packed` (GPTQ 4-bit g64, embedding 4-bit),
`coded` (the same artifact entropy-coded, `--codec auto`) and `claq-ecsq` (CLAQ 4-bit made for coding,
`--entropy-lambda 0.7`, coded). Budgets are percentages of the packed model's bytes in memory, the same
bytes for every variant. Storage bandwidth is simulated by a throttled reader: a read of n bytes that
took t seconds waits n / bandwidth - t more (rdquant: stream.Storage in the streamer's reader thread;
accelerate: its OffloadedWeightsLoader.__getitem__ wrapped the same way, reads from RAM not throttled).
`cold` rows read the real file with each read's pages dropped from the page cache (posix_fadvise).
Each row runs in its own process (its own peak RSS; MALLOC_ARENA_MAX=1 for every variant); the greedy tokens
of every rdquant row are checked against the same artifact fully loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / "cache" / "offload"
RESULTS = ROOT / "bench" / "results" / "offload.json"
PLOT = "bench/plots/offload.png"
PROMPT = "The history of the city of Paris begins"
ARTIFACTS = {  # variant -> (directory, command that makes it)
    "packed": ("w4", "rdquant compress --model smollm2-135m --bits 4 --group-size 64 --embed-bits 4 --out {out}"),
    "coded": ("w4c", "rdquant recode {cache}/w4 --out {out} --codec auto"),
    "claq-ecsq": ("claq4e", "rdquant compress --model smollm2-135m --method claq --bits 4 --embed-bits 4 "
                            "--entropy-lambda 0.7 --codec auto --out {out}"),
}
VARIANTS = ("accelerate-fp16", *ARTIFACTS)


def rss_mib(field: str = "VmRSS") -> float:
    """This process's resident memory (VmRSS), or its peak since start / the last reset_peak (VmHWM)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    """Start VmHWM afresh from the current RSS (Linux: /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def child(spec: dict) -> dict:
    """One row, in this process: load under the budget, warm up (first reads verify checksums), time
    `tokens` greedy tokens."""
    import torch

    import rdquant
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device("meta"):  # the model's code imported and run once: part of the runtime, not the weights
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(CACHE / "w4"))
    base_rss = rss_mib()  # the runtime: Python, torch, transformers, the model's code
    budget = spec["budget_bytes"]
    bw = spec["bandwidth_gbps"] * 1e9 if spec["bandwidth_gbps"] else None
    t0 = time.perf_counter()
    stats = {}
    if spec["variant"] == "accelerate-fp16":
        from accelerate.utils import offload

        read = {"bytes": 0, "s": 0.0}
        original = offload.OffloadedWeightsLoader.__getitem__

        def throttled(self, key):  # reads from the checkpoint on storage (not the in-RAM state dict) wait
            t = time.perf_counter()
            value = original(self, key)
            if key not in self.state_dict:
                n = value.numel() * value.element_size()
                info = self.index.get(key, {})
                if spec["cold"] and info.get("safetensors_file"):
                    fd = os.open(info["safetensors_file"], os.O_RDONLY)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    os.close(fd)
                if bw:
                    rest = n / bw - (time.perf_counter() - t)
                    if rest > 0:
                        time.sleep(rest)
                read["bytes"] += n
                read["s"] += time.perf_counter() - t
            return value

        offload.OffloadedWeightsLoader.__getitem__ = throttled
        limits = {"cpu": budget} if spec["device"] == "cpu" else {0: budget, "cpu": 0}  # the rest on disk
        model = AutoModelForCausalLM.from_pretrained(CACHE / "fp16", dtype=torch.float16, device_map="auto",
                                                     max_memory=limits, offload_folder=str(CACHE / "offload"))
        tok = rdquant.load_tokenizer(CACHE / "w4")  # the same tokenizer
        placement = sorted(set(model.hf_device_map.values()), key=str) if hasattr(model, "hf_device_map") else ["cpu"]
        stats["placement"] = "+".join(map(str, placement))
    else:
        from rdquant.stream import Storage, streamer_of

        path = CACHE / ARTIFACTS[spec["variant"]][0]
        model = rdquant.load(path, max_memory=budget, storage=Storage(bandwidth=bw, drop_cache=spec["cold"]),
                             device=spec["device"], dtype=torch.float16 if spec["device"] != "cpu" else torch.float32)
        tok = rdquant.load_tokenizer(path)
        plan = getattr(model, "_rdquant_plan", None)
        stats["placement"] = plan.describe() if plan else "no budget: everything resident, cached backend"
        read = None
    load_s = time.perf_counter() - t0
    load_peak = rss_mib("VmHWM")
    reset_peak()  # the generation's own peak from here
    loaded_rss = rss_mib()
    ids = tok(PROMPT, return_tensors="pt")["input_ids"].to(spec["device"])
    gen = dict(do_sample=False, pad_token_id=tok.eos_token_id)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **gen)  # warm-up: first reads, checksums
        if spec["variant"] != "accelerate-fp16" and streamer_of(model) is not None:
            st0 = streamer_of(model).stats.as_dict()
        elif read is not None:
            read["bytes"], read["s"] = 0, 0.0
        t1 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=spec["tokens"], min_new_tokens=spec["tokens"], **gen)
        seconds = time.perf_counter() - t1
    new = out[0, ids.shape[1]:].tolist()
    n = len(new)
    if spec["variant"] != "accelerate-fp16":
        st = streamer_of(model)
        if st is not None:
            s = st.stats.as_dict()
            stats.update(mib_read_per_token=round((s["bytes_read"] - st0["bytes_read"]) / 2**20 / n, 2),
                         wait_s_per_token=round((s["wait_s"] - st0["wait_s"]) / n, 4),
                         decode_s_per_token=round((s["decode_s"] - st0["decode_s"]) / n, 4),
                         streamed_peak_mib=round(s["peak_held"] / 2**20, 2))
        if plan is not None:
            stats["accounted_mib"] = round(plan.accounted / 2**20, 2)
    else:
        stats["mib_read_per_token"] = round(read["bytes"] / 2**20 / n, 2)
    peak = rss_mib("VmHWM")
    if spec["device"] != "cpu":
        stats["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return {**spec, "tokens_out": new, "tokens_per_s": round(n / seconds, 3), "load_s": round(load_s, 2),
            "runtime_rss_mib": round(base_rss, 1), "loaded_rss_mib": round(loaded_rss, 1),
            "load_peak_rss_mib": round(load_peak, 1), "peak_rss_mib": round(peak, 1), **stats}


def ensure_inputs(variants: list[str]) -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    if "accelerate-fp16" in variants and not (CACHE / "fp16").exists():
        import torch
        from rdquant.models import load_model

        m, tok, _ = load_model("smollm2-135m", dtype=torch.float16)
        m.save_pretrained(CACHE / "fp16")
        tok.save_pretrained(CACHE / "fp16")
    for v in variants:
        if v in ARTIFACTS and not (CACHE / ARTIFACTS[v][0]).exists():
            if v == "coded":
                ensure_inputs(["packed"])
            cmd = ARTIFACTS[v][1].format(out=CACHE / ARTIFACTS[v][0], cache=CACHE)
            print(f"making {v}: {cmd}", flush=True)
            subprocess.run(cmd.split() + (["--no-progress"] if "compress" in cmd else []), check=True)


def packed_bytes() -> int:
    from rdquant.artifact import read_manifest
    from rdquant.stream import make_plan

    return make_plan(read_manifest(CACHE / "w4"), None).total


def run_row(spec: dict) -> dict:
    # one malloc arena for every thread (glibc reads it at start-up): with an arena per thread, blocks read
    # in one thread and freed in another made peak RSS vary by 300 MB between identical runs
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "MALLOC_ARENA_MAX": "1"}
    r = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        err = [line for line in r.stderr.strip().splitlines() if line.strip()]
        return {**spec, "error": err[-1] if err else f"exit {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--budgets", nargs="+", type=float, default=[25, 50, 100], help="%% of the packed model's bytes")
    ap.add_argument("--bandwidths", nargs="+", type=float, default=[0.25, 1, 3], help="simulated storage, GB/s")
    ap.add_argument("--cold-budget", type=float, default=50, help="budget %% of the page-cache-dropped rows (0: none)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: the budget is then GPU memory (float16 weights)")
    ap.add_argument("--json", type=Path, default=RESULTS)
    ap.add_argument("--rewrite", action="store_true", help="re-render --json from its own rows (no runs)")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.rewrite:
        rows = json.loads(args.json.read_text())["rows"]
        args.variants = list(dict.fromkeys(r["variant"] for r in rows))
        args.budgets = sorted({r["budget_pct"] for r in rows if r["budget_pct"] and not r["cold"]})
        args.bandwidths = sorted({r["bandwidth_gbps"] for r in rows if r["bandwidth_gbps"]})
        args.tokens = rows[0]["tokens"]
        write(rows, packed_bytes(), args)
        return
    ensure_inputs(args.variants)
    total = packed_bytes()
    specs = []
    for v in args.variants:
        if v in ARTIFACTS:  # the reference: fully loaded, no budget
            specs.append(dict(variant=v, budget_pct=None, budget_bytes=None, bandwidth_gbps=None, cold=False))
        for pct in args.budgets:
            for bw in args.bandwidths:
                specs.append(dict(variant=v, budget_pct=pct, budget_bytes=int(total * pct / 100), bandwidth_gbps=bw,
                                  cold=False))
        if args.cold_budget:
            specs.append(dict(variant=v, budget_pct=args.cold_budget, budget_bytes=int(total * args.cold_budget / 100),
                              bandwidth_gbps=None, cold=True))
    rows, reference = [], {}
    for spec in specs:
        spec["tokens"], spec["device"] = args.tokens, args.device
        t0 = time.perf_counter()
        row = run_row(spec)
        if spec["budget_pct"] is None and "tokens_out" in row:
            reference[spec["variant"]] = row["tokens_out"]
        if "tokens_out" in row and spec["variant"] in reference:
            row["same_tokens"] = row["tokens_out"] == reference[spec["variant"]]
        row.pop("tokens_out", None)
        rows.append(row)
        print(f"{spec['variant']:>16} {str(spec['budget_pct']):>5}% {str(spec['bandwidth_gbps']):>5} GB/s "
              f"{'cold' if spec['cold'] else '':4} -> {row.get('tokens_per_s', row.get('error'))} tok/s "
              f"peak {row.get('peak_rss_mib')} MiB ({time.perf_counter() - t0:.0f} s)", flush=True)
    write(rows, total, args)


def write(rows: list[dict], total: int, args) -> None:
    import torch

    machine = (f"{platform.machine()} CPU, {torch.get_num_threads()} threads, PyTorch {torch.__version__}"
               if args.device == "cpu" else f"{torch.cuda.get_device_name()}, PyTorch {torch.__version__}")
    command = "python " + " ".join([Path(sys.argv[0]).relative_to(ROOT).as_posix() if Path(sys.argv[0]).is_absolute()
                                    else sys.argv[0], *sys.argv[1:]])
    for r in rows:
        for k, v in dict(command=command, machine=machine, date=date.today().isoformat(), source="bench/offload.py").items():
            r.setdefault(k, v)  # (--rewrite keeps each row's own)
        b = r.get("budget_bytes")
        r["budget_mib"] = round(b / 2**20, 2) if b else None
        r["storage"] = "cold file" if r["cold"] else (f"{r['bandwidth_gbps']:g} GB/s" if r["bandwidth_gbps"] else "-")
        if b and "peak_rss_mib" in r:
            r["over_budget_mib"] = round(r["peak_rss_mib"] - b / 2**20, 1)
            r["beyond_mib"] = round(r["peak_rss_mib"] - r["runtime_rss_mib"] - b / 2**20, 1)

    def tps(variant, pct, bw):
        for r in rows:
            if r["variant"] == variant and r["budget_pct"] == pct and r["bandwidth_gbps"] == bw and not r["cold"]:
                return r.get("tokens_per_s")
        return None

    summary = []
    for pct in args.budgets:
        for bw in args.bandwidths:
            c, p, a = tps("coded", pct, bw), tps("packed", pct, bw), tps("accelerate-fp16", pct, bw)
            summary.append({"budget_pct": pct, "bandwidth_gbps": bw,
                            "coded_vs_packed": round(c / p, 3) if c and p else None,
                            "coded_vs_accelerate": round(c / a, 3) if c and a else None})
    result = {
        "title": "Memory-limited inference: streaming blocks from storage",
        "question": "*When the weights do not fit the memory budget, how fast does greedy decoding run, and what "
                    "does entropy coding buy?*",
        "intro": (f"The default model, greedy decoding of {args.tokens} tokens after a short prompt, each row its own "
                  f"process. Budgets are % of the packed 4-bit model's bytes in memory ({total / 2**20:.1f} MiB), the "
                  "same bytes for every variant. rdquant keeps the embedding/head and the leading blocks that fit, and "
                  "streams the rest per token with one block read ahead (`load(..., max_memory=)`); accelerate-fp16 "
                  "is transformers' `device_map=\"auto\"` with `max_memory` and `offload_folder`. Storage speed is "
                  "simulated by a throttled reader (a read of n bytes waits until n / bandwidth has passed); `cold "
                  "file` reads the real file with its pages dropped from the page cache after each read. Every process runs "
                  "with MALLOC_ARENA_MAX=1 (glibc: one heap for all threads; docs/notes/2026-12-05-offload.md). *same "
                  "tokens*: greedy tokens equal to the fully loaded artifact's. *over budget*: peak RSS minus the "
                  "budget during generation, the runtime (*runtime RSS*: Python, torch, transformers and the model's code before "
                  "loading) included; *beyond runtime + budget*: what is left (tokenizer, activations, KV cache, "
                  "dequantization temporaries, allocator slack; for accelerate its memory-mapped file pages). "
                  f"Plot: {PLOT}. Ratios: " + "; ".join(
                      f"{s['budget_pct']:g}% / {s['bandwidth_gbps']:g} GB/s: coded/packed {s['coded_vs_packed']}, "
                      f"coded/accelerate {s['coded_vs_accelerate']}" for s in summary)),
        "columns": [["variant", "variant"], ["budget_pct", "budget %", ".0f"], ["budget_mib", "budget MiB", ".1f"],
                    ["storage", "storage"], ["tokens_per_s", "tokens/s", ".2f"], ["mib_read_per_token", "MiB read/token"],
                    ["same_tokens", "same tokens"], ["runtime_rss_mib", "runtime RSS MiB", ".0f"],
                    ["peak_rss_mib", "peak RSS MiB", ".0f"], ["over_budget_mib", "over budget MiB", ".0f"],
                    ["beyond_mib", "beyond runtime + budget MiB", ".0f"],
                    ["peak_gpu_mib", "peak GPU MiB", ".0f"],
                    ["placement", "placement"], ["machine", "machine"]],
        "summary": summary,
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")
    try:
        plot(rows, args, ROOT / PLOT)
    except ImportError:
        print("matplotlib missing (the bench extra): no plot")


def plot(rows: list[dict], args, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.bandwidths), figsize=(5 * len(args.bandwidths), 4.2), sharey=True, squeeze=False)
    for ax, bw in zip(axes[0], args.bandwidths):
        for v in args.variants:
            pts = sorted((r["budget_pct"], r["tokens_per_s"]) for r in rows if r["variant"] == v
                         and r["bandwidth_gbps"] == bw and not r["cold"] and r.get("tokens_per_s"))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=v)
        ax.set_title(f"storage {bw:g} GB/s")
        ax.set_xlabel("budget, % of the packed 4-bit model")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("tokens/s (greedy, 2 CPU threads)")
    axes[0][0].legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
