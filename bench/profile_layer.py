"""Where one layer's quantization spends its time: torch.profiler's top operations (CUDA and CPU time)
for a method on a random layer with a real model's shape, after one warm-up run.

  python bench/profile_layer.py --method claq --shape 4096x14336 --rows 20
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="claq", choices=["claq", "gptq"])
    ap.add_argument("--shape", default="4096x4096", help="OUTxIN")
    ap.add_argument("--target-bits", type=float, default=3.1)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rows", type=int, default=25, help="lines of the table")
    args = ap.parse_args()

    from rdquant.config import CompressConfig
    from rdquant.methods.claq import claq_quantize
    from rdquant.methods.gptq import gptq_quantize

    out_f, in_f = (int(v) for v in args.shape.split("x"))
    g = torch.Generator(device=args.device).manual_seed(0)
    W = torch.randn(out_f, in_f, generator=g, device=args.device) * 0.02
    X = torch.randn(8192, in_f, generator=g, device=args.device) * torch.rand(in_f, generator=g, device=args.device) * 3
    H = 2 * X.t() @ X / X.shape[0]
    del X
    if args.method == "claq":
        cfg = CompressConfig(method="claq", target_bits=args.target_bits, device=args.device)
        run = lambda: claq_quantize(W, H, cfg)
    else:
        cfg = CompressConfig(bits=4, group_size=128, device=args.device)
        run = lambda: gptq_quantize(W, H, cfg)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    run()
    sync()
    t0 = time.perf_counter()
    run()
    sync()
    print(f"{args.method} {args.shape}: {time.perf_counter() - t0:.3f} s per layer")
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with torch.profiler.profile(activities=acts) as prof:
        run()
        sync()
    key = "cuda_time_total" if args.device.startswith("cuda") else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
