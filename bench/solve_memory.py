"""Peak memory of one layer's solve, measured without a GPU: the bytes of all tensors alive at once.

rdquant.testing.LiveBytes (a TorchDispatchMode) sees every tensor an operator returns; each storage
counts from its creation (or first use) until it is freed. The solve runs the same code on any device (the fused CUDA kernels aside), so the peak, in
units of the layer's fp32 Hessian [in, in], tells where the GPU peak of bench/scale.py comes from and
checks a memory change before a GPU run. One stage of the pipeline: quantize_stage (the method's solve,
the QuantLinear swap, the layer's log line) on a down_proj-shaped layer.

  python bench/solve_memory.py --rows 1024 --cols 3584 --methods gptq claq
  python bench/solve_memory.py --rows 4096 --cols 14336 --device cuda   # the allocator's peak on a GPU

On a GPU the peak is CUDA's allocator statistic (workspaces of cuSOLVER and the kernels included, which
LiveBytes does not see), less what was allocated before the stage (H and the weight).
"""

from __future__ import annotations

import argparse
import json

import torch

from rdquant.testing import LiveBytes


def measure(method: str, rows: int, cols: int, seed: int = 0, device: str = "cpu") -> dict:
    """Peak bytes of quantize_stage on one random [rows, cols] linear with a random positive definite H."""
    import rdquant
    from rdquant.pipeline import quantize_stage

    g = torch.Generator(device=device).manual_seed(seed)
    lin = torch.nn.Linear(cols, rows, bias=False, device=device)
    lin.weight.data = torch.randn(rows, cols, generator=g, device=device) * 0.02
    X = torch.randn(2 * cols, cols, generator=g, device=device) * torch.rand(cols, generator=g, device=device)
    H = 2 * X.t() @ X / X.shape[0]
    del X
    block = torch.nn.Module()
    block.down_proj = lin
    kw = {"gptq": dict(method="gptq", bits=4, group_size=128), "claq": dict(method="claq", target_bits=3.1),
          "rtn": dict(method="rtn", bits=4, group_size=128)}[method]
    cfg = rdquant.CompressConfig(**kw, device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        quantize_stage(block, {"down_proj": lin}, ["down_proj"], H, cfg, "", torch.float32)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with LiveBytes() as mode:
            quantize_stage(block, {"down_proj": lin}, ["down_proj"], H, cfg, "", torch.float32)
        peak = mode.peak
    h = H.numel() * H.element_size()
    return {"method": method, "rows": rows, "cols": cols, "device": device, "peak_bytes": peak, "hessian_bytes": h,
            "weight_fp32_bytes": rows * cols * 4, "peak_in_hessians": round(peak / h, 2),
            "peak_in_weights": round(peak / (rows * cols * 4), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=3584)
    ap.add_argument("--methods", nargs="+", default=["gptq"])
    ap.add_argument("--device", default="cpu", help="cpu (LiveBytes) or cuda (the allocator's peak)")
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = [measure(m, args.rows, args.cols, device=args.device) for m in args.methods]
    print(f"{'method':8} {'shape':>12} {'peak MB':>9} {'x H':>6} {'x W fp32':>9}")
    for r in rows:
        print(f"{r['method']:8} {str(r['rows']) + 'x' + str(r['cols']):>12} {r['peak_bytes'] / 1e6:>9.1f} "
              f"{r['peak_in_hessians']:>6} {r['peak_in_weights']:>9}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
