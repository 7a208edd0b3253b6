"""Matmul speed of rdquant's GPU kernels against torch fp16 (and torch's int4 tinygemm where this torch
has it), with the correctness check of every kernel result in the same run. Llama-3-8B shapes
(4096->6144 qkv, 4096->4096 o, 4096->28672 gate+up, 14336->4096 down), batch 1/16/64, affine codes at
4/3/2 bits with group 128 (asymmetric). Median of >= 50 timed repetitions after warm-up (CUDA events).
Prints a table and writes its rows as JSON.

    python bench/speed.py [--json OUT.json] [--quick]

Loads src/rdquant/kernels/affine_triton.py by path (it imports only torch and triton), so it runs on a
machine with just PyTorch and Triton.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"qkv 4096->6144": (4096, 6144), "o 4096->4096": (4096, 4096), "gate+up 4096->28672": (4096, 28672),
          "down 14336->4096": (14336, 4096)}
# (block_n, block_k, num_warps, num_stages, split_k or None = the kernel's default) tried per case
CONFIGS = [(64, 128, 4, 3, None), (128, 128, 4, 3, None), (128, 128, 8, 3, None), (64, 256, 4, 2, None),
           (128, 256, 8, 2, None), (256, 128, 8, 3, None), (128, 128, 4, 4, 1), (64, 128, 4, 4, 1), (32, 128, 4, 4, 1)]


def load_kernel():
    spec = importlib.util.spec_from_file_location("affine_triton", ROOT / "src" / "rdquant" / "kernels" / "affine_triton.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["affine_triton"] = mod  # (dataclasses look their module up there)
    spec.loader.exec_module(mod)
    return mod


def median_ms(fn, reps: int = 50, warmup: int = 10) -> float:
    """Median time of one call, in a CUDA graph when the call can be captured (no Python launch cost:
    what a served model, captured whole, pays), else launched from Python."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        run = graph.replay
    except Exception:  # noqa: BLE001 - not capturable: time the plain launches
        run = fn
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def tinygemm(W: torch.Tensor, group: int):
    """torch's int4 kernel (_weight_int4pack_mm), or None where this torch does not have it."""
    try:
        N, K = W.shape
        w = W.float()
        wg = w.view(N, K // group, group)
        lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp_min(1e-8)
        q = ((wg - lo) / scale).round().clamp(0, 15).to(torch.int32).view(N, K)
        zero = lo + 8 * scale  # tinygemm's zero point is the value of code 8
        sz = torch.cat([scale, zero], -1).view(N, K // group, 2).transpose(0, 1).contiguous().to(torch.bfloat16)
        packed = torch.ops.aten._convert_weight_to_int4pack(q.to(torch.uint8) if hasattr(torch, "uint4") else q, 8)
        return lambda x: torch.ops.aten._weight_int4pack_mm(x, packed, group, sz)
    except Exception as e:  # noqa: BLE001 - report why it is missing, keep benchmarking the rest
        print(f"  tinygemm unavailable: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="one shape, batch 1 (a smoke run)")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    ap.add_argument("--group", type=int, default=128)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/speed.py needs a CUDA GPU")
    k = load_kernel()
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name()
    print(f"{name} | torch {torch.__version__} | triton {k.triton.__version__}", flush=True)
    shapes = dict(list(SHAPES.items())[:1]) if args.quick else SHAPES
    batches = [1] if args.quick else [1, 16, 64]
    rows = []
    g = torch.Generator(device=dev).manual_seed(0)
    for label, (K, N) in shapes.items():
        W16 = (torch.randn(N, K, device=dev, generator=g) * 0.02).half()
        tg = tinygemm(W16, args.group) if args.bits and 4 in args.bits else None
        for bits in args.bits:
            G = args.group
            n_g = -(-K // G)
            codes = torch.randint(0, 1 << bits, (N, K), device=dev, dtype=torch.uint8, generator=g)
            scales = (torch.rand(N, n_g, device=dev, generator=g) * 0.01 + 0.001).half()
            zeros = torch.randint(0, 1 << bits, (N, n_g), device=dev, dtype=torch.uint8, generator=g)
            p = k.repack(codes, scales, zeros, bits, G)
            expand = lambda t: t.float().repeat_interleave(G, 1)[:, :K]
            Wq = ((codes.float() - expand(zeros)) * expand(scales)).half()  # the reference dequantized weight
            for M in batches:
                x = torch.randn(M, K, device=dev, generator=g).half()
                t_fp16 = median_ms(lambda: torch.nn.functional.linear(x, W16))
                ref = torch.nn.functional.linear(x, Wq).float()
                best = None
                errors = []
                for bn, bk, nw, ns, sk in CONFIGS:
                    launch = dict(block_n=bn, block_k=bk, num_warps=nw, num_stages=ns, split_k=sk)
                    try:
                        y = k.affine_matmul(x, p, **launch).float()
                    except k.triton.runtime.errors.OutOfResources:  # the tile does not fit this GPU's shared memory
                        continue
                    err = float((y - ref).abs().max() / ref.abs().max())
                    errors.append(err)
                    t = median_ms(lambda: k.affine_matmul(x, p, **launch))
                    if best is None or t < best[0]:
                        best = (t, launch, err)
                best = (best[0], best[1], max(errors))  # every config must be exact
                t_tg = None
                if tg is not None and bits == 4 and M in (1, 16, 64):
                    try:
                        xb = x.to(torch.bfloat16)
                        t_tg = median_ms(lambda: tg(xb))
                    except Exception as e:  # noqa: BLE001
                        print(f"  tinygemm failed at batch {M}: {type(e).__name__}", flush=True)
                t, launch, err = best
                row = {"shape": label, "K": K, "N": N, "batch": M, "bits": bits, "group": G,
                       "fp16_ms": round(t_fp16, 4), "rdquant_triton_ms": round(t, 4),
                       "speedup_vs_fp16": round(t_fp16 / t, 2), "tinygemm_ms": None if t_tg is None else round(t_tg, 4),
                       "tinygemm_speedup_vs_fp16": None if t_tg is None else round(t_fp16 / t_tg, 2),
                       "launch": launch, "max_rel_error": err, "exact": err <= 1e-2}
                rows.append(row)
                print(f"{label:22} b={M:<3} {bits}-bit g{G}: fp16 {t_fp16:.4f} ms | triton {t:.4f} ms "
                      f"({t_fp16 / t:.2f}x, {launch}, rel err {err:.1e})"
                      + ("" if t_tg is None else f" | tinygemm {t_tg:.4f} ms ({t_fp16 / t_tg:.2f}x)"), flush=True)
    bad = [r for r in rows if not r["exact"]]
    print(f"\ncorrectness: {len(rows) - len(bad)}/{len(rows)} kernel results within 1e-2 of dequantize-then-matmul")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "date": date.today().isoformat(),
                                         "command": "python bench/speed.py " + " ".join(sys.argv[1:]),
                                         "host": platform.node(), "rows": rows}, indent=1))
    if bad:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
