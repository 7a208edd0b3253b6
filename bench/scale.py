"""Compression at real model sizes: time, GPU memory and host memory per method and depth.

Builds a Llama-shaped model from a config with random weights (source.SyntheticBlocks: one block
materialised at a time, so a 70B shape needs no checkpoint), calibrates on random tokens and runs
rdquant's methods through the streamed pipeline. Each (method, depth) runs in its own process so its
peak host RSS is its own. Prints a table; --json writes the rows.

  python bench/scale.py --shape 8b --layers 2 32 --methods gptq claq --json bench/results/raw/scale.json

Method `llmcompressor`: llm-compressor's GPTQ W4A16 g128 (`oneshot`, its sequential pipeline, batch 1 as
its default) on the same weights and calibration tokens. It needs its own site directory (it pins an
older transformers): `--peer-site DIR` goes first on that run's PYTHONPATH (bench/peers/README.md). The
model is materialised whole on the host, as llm-compressor loads it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

SHAPES = {
    # hidden, MLP, query heads, KV heads, vocab, layers of the real model
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
               vocab_size=128256, layers=32),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                vocab_size=128256, layers=80),
    # the 8B shape's widths / 8 (head dim 128 kept): CPU runs of the memory pattern (--phase-peaks)
    "8b-mini": dict(hidden_size=512, intermediate_size=1792, num_attention_heads=4, num_key_value_heads=1,
                    vocab_size=16032, layers=32),
    # the default model's (SmolLM2-135M) widths: bench/alloc_memory.py's test shape
    "135m": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                 vocab_size=49152, layers=30),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=1000, layers=4),
}
METHOD_ARGS = {
    "gptq": dict(method="gptq", bits=4, group_size=128),
    "cvxq": dict(method="cvxq", target_bits=4.25, group_size=128),
    "claq": dict(method="claq", target_bits=3.1),
    "gptq-tune": dict(method="gptq", bits=4, group_size=128, tune_steps=16, tune_scope="block"),  # block tuning
    "llmcompressor": None,  # the peer: one_llmcompressor
}


def one(args: argparse.Namespace) -> dict:
    """One run in this process: the row of the table."""
    import resource

    import torch
    from transformers import LlamaConfig

    import rdquant
    from rdquant.source import SyntheticBlocks

    shape = dict(SHAPES[args.shape])
    shape.pop("layers")
    config = LlamaConfig(**shape, num_hidden_layers=args.one_layers, max_position_embeddings=max(8192, args.seqlen),
                         tie_word_embeddings=False)
    device = args.device
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    src = SyntheticBlocks(config, dtype, seed=0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (args.samples, args.seqlen), generator=g)
    if args.one_method == "llmcompressor":
        return one_llmcompressor(args, src, ids)
    cfg = rdquant.CompressConfig(**METHOD_ARGS[args.one_method], device=device, calib_samples=args.samples,
                                 calib_seqlen=args.seqlen, batch_size=args.batch, activations=args.activations,
                                 reuse_activations=not args.no_reuse)
    live = None
    if args.phase_peaks and device.startswith("cuda"):
        phases, note = _watch_phases(torch.cuda.max_memory_allocated, torch.cuda.reset_peak_memory_stats)
    elif args.phase_peaks:  # on the CPU: the bytes of live tensors (parked activations and weights included)
        from rdquant.testing import LiveBytes

        live = LiveBytes()
        phases, note = _watch_phases(lambda: live.peak, lambda: setattr(live, "peak", live.live))
    else:
        phases, note = None, None
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp, live or contextlib.nullcontext():
        t0 = time.perf_counter()
        cm = rdquant.compress(src, cfg, calib_ids=ids, checkpoint_dir=Path(tmp) / "run.partial", progress=args.progress,
                              model_id=f"synthetic-{args.shape}")
        seconds = time.perf_counter() - t0
        save_s = None
        if args.save:
            t1 = time.perf_counter()
            cm.save(Path(tmp) / "artifact")
            save_s = time.perf_counter() - t1
    row = {
        "shape": args.shape, "method": args.one_method, "layers": args.one_layers, "samples": args.samples,
        "seqlen": args.seqlen, "batch": args.batch, "activations": args.activations,
        "reuse_activations": not args.no_reuse, "device": device, "label": args.label,
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        "seconds": round(seconds, 2),
        "seconds_per_layer": round(seconds / args.one_layers, 3),
        "solve_seconds": round(sum(l.seconds for l in cm.logs), 2),
        **_gpu_peaks(device),
        "peak_host_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "save_seconds": round(save_s, 2) if save_s is not None else None,
    }
    if phases is not None and live is None:
        note()
        row["phase_peak_gpu_gib"] = {k: round(v / 2**30, 2) for k, v in phases.items()}
        row["peak_gpu_gib"] = row["phase_peak_gpu_gib"]["run"]  # the stats were reset per phase
    elif phases is not None:
        note()
        row["phase_peak_live_gib"] = {k: round(v / 2**30, 3) for k, v in phases.items()}
    plan = getattr(cm, "method_state", None)
    if plan is not None and getattr(plan, "phases", None):  # cvxq: where the allocation's time went
        row["plan_seconds"] = {**plan.phases, "total": round(plan.seconds, 2)}
    if cm.tuning and cm.tuning.get("scope") == "block":  # block tuning: its seconds and the blocks' mean error
        t = cm.tuning
        row["tuning"] = {"seconds": t["seconds"], "steps_per_block": t["steps_per_block"],
                         "mean_error_before": round(sum(t["error_before"]) / t["blocks"], 6),
                         "mean_error_after": round(sum(t["error_after"]) / t["blocks"], 6)}
    if device.startswith("cuda"):
        row["gpu"] = torch.cuda.get_device_name()
    return row


def _watch_phases(peak: Callable[[], int], reset: Callable[[], None]) -> tuple[dict[str, int], Callable[[], None]]:
    """Peak memory inside each pipeline phase (capture, Hessians, solve, propagate, targets, vocabulary), over
    all blocks: which step sets the run's peak. `peak`/`reset` read and restart the meter (CUDA's allocator
    statistics, or rdquant.testing.LiveBytes on the CPU). Wraps the pipeline's functions in this process; a
    phase inside another counts for both, and "run" keeps the whole run's peak."""
    from rdquant import pipeline, vocab

    peaks: dict[str, int] = {"run": 0}
    active = ["run"]

    def note() -> None:
        cur = peak()
        for ph in active:
            peaks[ph] = max(peaks.get(ph, 0), cur)

    def watch(module, name: str) -> None:
        inner = getattr(module, name)

        def wrapped(*a, **k):
            note()
            reset()
            active.append(name)
            try:
                return inner(*a, **k)
            finally:
                note()
                active.pop()

        setattr(module, name, wrapped)

    from rdquant import sensitivity
    from rdquant.methods import cvxq

    for name in ("capture_block_inputs", "stage_hessian", "quantize_stage", "propagate", "block_targets"):
        watch(pipeline, name)
    watch(vocab, "quantize_vocab")
    # CVXQ's plan: the block-wise sensitivity pass (the head's and the embedding's parts), the cells, the allocation
    watch(sensitivity, "blockwise_gradient_sensitivity")
    watch(vocab.VocabSensitivity, "add_head")
    watch(vocab.VocabSensitivity, "add_embedding")
    watch(cvxq, "layer_cells")
    watch(cvxq, "allocate")
    return peaks, note  # call note() at the end: the last phase's peak is in the stats only


def _gpu_peaks(device: str) -> dict:
    """Peak GPU memory of this process: allocated by tensors, and reserved by PyTorch's caching allocator."""
    import torch

    if not device.startswith("cuda"):
        return {"peak_gpu_gib": None}
    return {"peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "peak_gpu_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2)}


def one_llmcompressor(args: argparse.Namespace, src, ids) -> dict:
    """llm-compressor's GPTQ on the synthetic model: its blocks filled with the weights rdquant's runs get
    (generated on the same device kind), the whole model on the host; only oneshot() is timed."""
    import importlib.util
    import resource

    import torch
    from llmcompressor import oneshot
    from torch.utils.data import DataLoader
    from llmcompressor import __version__ as lc_version

    for i in range(len(src)):
        src.load(i, args.device).to("cpu")
    model = src.model.eval()
    cfg_dir = tempfile.mkdtemp(dir=args.tmp)  # oneshot re-reads the config from name_or_path: config.json only
    model.config.save_pretrained(cfg_dir)
    model.config.name_or_path = cfg_dir
    spec = importlib.util.spec_from_file_location("lc_gptq", Path(__file__).parent / "peers" / "llmcompressor_gptq.py")
    lc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lc)  # the recipe of the default-model peer rows
    recipe = lc.build_recipe(argparse.Namespace(bits=4, group_size=128, ignore=["lm_head"], dampening=0.01,
                                                block_size=128, actorder="default"))
    # the windows as a DataLoader of [1, seqlen] batches (what oneshot's own collator makes of a Dataset):
    # a datasets.Dataset goes through .map, whose fingerprinting fails on Python 3.12 with pyarrow 26 (dill)
    ds = DataLoader([{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in ids], batch_size=1)
    # oneshot wants a processor when given a dataset; the windows are tokens already, so a one-word one
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>")),
                                  unk_token="<unk>", pad_token="<unk>")
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    oneshot(model=model, processor=tok, dataset=ds, recipe=recipe, num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1],
            batch_size=1, shuffle_calibration_samples=False, output_dir=None)
    seconds = time.perf_counter() - t0
    n = args.one_layers
    quantized = sum(hasattr(m, "weight_scale") for m in model.modules())  # that it ran: linears with scales
    row = {"shape": args.shape, "method": "llmcompressor", "tool": f"llm-compressor {lc_version}", "layers": n,
           "samples": args.samples, "seqlen": args.seqlen, "batch": 1, "device": args.device,
           "seconds": round(seconds, 2), "seconds_per_layer": round(seconds / n, 3), "solve_seconds": None,
           "quantized_linears": quantized,
           **_gpu_peaks(args.device),
           "peak_host_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    if args.device.startswith("cuda"):
        row["gpu"] = torch.cuda.get_device_name()
    return row


def checks(device: str) -> list[dict]:
    """GPU exactness checks of the scale path: the fused GPTQ and CLAQ block kernels against the Python
    loop on a real-sized layer (codes agreeing, proxy error, time), and the 16-bit Hessian GEMM against fp32."""
    import torch

    from rdquant.config import CompressConfig
    from rdquant.hessian import HessianAccumulator
    from rdquant.methods import gptq as G

    out = []
    g = torch.Generator(device=device).manual_seed(0)
    rows, cols = 4096, 4096
    W = torch.randn(rows, cols, generator=g, device=device) * 0.02
    X = (torch.randn(8192, cols, generator=g, device=device) * torch.rand(cols, generator=g, device=device) * 3)
    H = 2 * X.t() @ X / X.shape[0]
    from rdquant.methods.claq import claq_quantize

    def fused_vs_loop(check: str, quantize, kw: dict) -> dict:
        """One layer quantized with the Python loop and with the fused kernels: codes, error, time."""
        real, res = G._block_kernel, {}
        for fused in (False, True):
            G._block_kernel = lambda W_, kernel, f=fused: real(W_, f)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            q = quantize(CompressConfig(**kw, device=device))
            torch.cuda.synchronize()
            res[fused] = (q, time.perf_counter() - t0)
        G._block_kernel = real
        (a, ta), (b, tb) = res[False], res[True]
        return {"check": check, **kw, "codes_equal": round(float((a.codes == b.codes).float().mean()), 6),
                "proxy_loop": G.proxy_error(W, a.dequantize(), H), "proxy_fused": G.proxy_error(W, b.dequantize(), H),
                "seconds_loop": round(ta, 3), "seconds_fused": round(tb, 3)}

    for kw in (dict(bits=4, group_size=128), dict(bits=3, group_size=64), dict(bits=2, group_size=64)):
        out.append(fused_vs_loop("gptq fused block", lambda c: G.gptq_quantize(W, H, c)[0], kw))
    for kw in (dict(method="claq", target_bits=3.1), dict(method="claq", target_bits=3.1, claq_outlier_frac=0.005)):
        out.append(fused_vs_loop("claq fused block", lambda c: claq_quantize(W, H, c)[0][0], kw))
    x = torch.randn(16 * 2048, 4096, generator=g, device=device).to(torch.bfloat16)
    a, b = HessianAccumulator(4096, device), HessianAccumulator(4096, device)
    a.add(x)
    b.add(x.float())
    rel = float((a.H - b.H).abs().max() / b.H.abs().max())
    out.append({"check": "bf16 Hessian GEMM vs fp32", "max_rel_diff": rel})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default="8b")
    ap.add_argument("--layers", type=int, nargs="+", default=[2])
    ap.add_argument("--methods", nargs="+", choices=METHOD_ARGS, default=["gptq"])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--activations", choices=["auto", "device", "cpu"], default="auto",
                    help="where rdquant's calibration activations wait between blocks (--activations of compress)")
    ap.add_argument("--phase-peaks", action="store_true",
                    help="also report the peak memory of each pipeline phase (GPU: allocator statistics; CPU: live "
                         "tensor bytes, parked activations included; CPU attention may materialise its scores)")
    ap.add_argument("--no-reuse", action="store_true", help="recompute submodule outputs instead of caching them "
                    "on the GPU between stages (reuse_activations: false; less GPU memory)")
    ap.add_argument("--save", action="store_true", help="also write the artifact (timed separately)")
    ap.add_argument("--tmp", default=None, help="directory for the run's block files")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--label", help="a note kept in the rows (which code, which setting)")
    ap.add_argument("--peer-site", help="site directory with llm-compressor and its pins (method llmcompressor)")
    ap.add_argument("--check", action="store_true", help="run the GPU exactness checks first")
    ap.add_argument("--one-method", help=argparse.SUPPRESS)
    ap.add_argument("--one-layers", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one_method:
        print("ROW " + json.dumps(one(args)), flush=True)
        return
    if "llmcompressor" in args.methods and not (args.peer_site and Path(args.peer_site, "llmcompressor").is_dir()):
        raise SystemExit("method llmcompressor needs --peer-site DIR, a site directory holding llm-compressor and its "
                         "pins (bench/peers/README.md)")
    rows = []
    if args.check:
        for r in checks(args.device):
            print(json.dumps(r), flush=True)
            rows.append(r)
    for method in args.methods:
        for layers in args.layers:
            cmd = [sys.executable, __file__, "--one-method", method, "--one-layers", str(layers)] + [
                a for a in sys.argv[1:] if a not in ("--json", "--check") and not a.endswith(".json")]
            t0 = time.perf_counter()
            env = dict(os.environ)
            if method == "llmcompressor":
                env["PYTHONPATH"] = os.pathsep.join(p for p in (args.peer_site, env.get("PYTHONPATH")) if p)
            p = subprocess.run(cmd, capture_output=True, text=True, env=env)
            row = next((json.loads(l[4:]) for l in p.stdout.splitlines() if l.startswith("ROW ")), None)
            if row is None:
                tail = (p.stderr or p.stdout).strip().splitlines()[-5:]
                row = {"shape": args.shape, "method": method, "layers": layers, "error": " | ".join(tail)}
            row["wall_seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'method':6} {'layers':>6} {'s':>8} {'s/layer':>8} {'solve s':>8} {'GPU GiB':>8} {'RSS GiB':>8}")
    for r in rows:
        if "check" in r:
            continue
        if "error" in r:
            print(f"{r['method']:6} {r['layers']:>6} error: {r['error']}")
            continue
        print(f"{r['method']:6} {r['layers']:>6} {r['seconds']:>8} {r['seconds_per_layer']:>8} {r['solve_seconds'] or '-':>8} "
              f"{r['peak_gpu_gib'] or '-':>8} {r['peak_host_rss_gib']:>8}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        old = json.loads(args.json.read_text()) if args.json.is_file() else []
        args.json.write_text(json.dumps(old + rows, indent=1))


if __name__ == "__main__":
    main()
