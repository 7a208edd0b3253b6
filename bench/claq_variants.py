"""CLAQ design choices, measured on real layers: proxy error tr((W-Q) H (W-Q)^T) of every stage of the
first --blocks blocks of the default model (weights and Hessians captured by the real pipeline at the
quality benchmark's calibration), relative to rdquant GPTQ 3-bit g64, and exact all-in bits/weight.

    python bench/claq_variants.py                                   # the table in docs/notes/benchmarks-lab.md
    python bench/claq_variants.py --blocks 2 'mine=dict(target_bits=3.1, claq_share=4)'

`rel` is the mean over stages of (error / GPTQ-3-bit-g64 error); `sum` is the summed error. Runs on one
thread so timings compare; the capture is cached in bench/cache/.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from rdquant.config import CompressConfig
from rdquant.methods.claq import claq_quantize
from rdquant.methods.gptq import gptq_quantize, proxy_error

CACHE = Path(__file__).resolve().parent / "cache"

DEFAULT = [
    "claq 3-bit, no row scale, fp16 books=dict(bits=3, claq_row_scale=False, claq_codebook_bits=16)",
    "claq 3-bit, row scale, fp16 books=dict(bits=3, claq_codebook_bits=16)",
    "claq 3-bit (defaults)=dict(bits=3)",
    "claq 3-bit, no per-column refinement=dict(bits=3, claq_refine_iters=0)",
    "claq 3.1, fp16 books, outlier policy=dict(target_bits=3.1, claq_codebook_bits=16, claq_policy='outlier')",
    "claq 3.1, outlier policy (CLAQ rule)=dict(target_bits=3.1, claq_policy='outlier')",
    "claq 3.1, outlier policy, high width 4=dict(target_bits=3.1, claq_policy='outlier', claq_high_bits=4)",
    "claq 3.1, rd policy (defaults)=dict(target_bits=3.1)",
    "claq 3.1, rd, 0.2% fp16 outliers=dict(target_bits=3.1, claq_outlier_frac=0.002)",
    "claq 3.1, rd, share 2=dict(target_bits=3.1, claq_share=2)",
    "claq 3.1, rd, share 4 (H_jj-weighted)=dict(target_bits=3.1, claq_share=4)",
    "claq 3.1, rd, share 4 unweighted=dict(target_bits=3.1, claq_share=4, claq_hessian_weight=False)",
    "claq 3.1, rd, row scales per 192 columns=dict(target_bits=3.1, claq_scale_group=192)",
    "claq 3.1, rd, row scales per 64 columns=dict(target_bits=3.1, claq_scale_group=64)",
    "claq 2.2, outlier policy=dict(target_bits=2.2, claq_policy='outlier')",
    "claq 2.2, rd policy=dict(target_bits=2.2)",
    "claq 2.2, rd, 0.5% fp16 outliers=dict(target_bits=2.2, claq_outlier_frac=0.005)",
]


def capture(blocks: int) -> list:
    """(W, H, parts) of every stage of the first `blocks` blocks, as the GPTQ pipeline sees them."""
    path = CACHE / f"stages_{blocks}blocks_c128x512.pt"
    if path.is_file():
        return torch.load(path)
    from safetensors.torch import load_file

    import rdquant
    from rdquant import methods
    from rdquant.models import load_model

    from quality import calib_file  # noqa: E402  (run as a script: bench/ is on sys.path)

    model, tok, mid = load_model("smollm2-135m")
    ids = load_file(calib_file(tok, 128, 512, 0))["input_ids"]
    saved, orig = [], methods.METHODS["gptq"]

    def keep(W, H, cfg, state, parts=None, *rest):
        saved.append((W.clone(), H.clone(), parts))
        return orig.quantize(W, H, cfg, state, parts, *rest)

    class Stop(Exception):
        pass

    def after(i):
        if i + 1 >= blocks:
            raise Stop

    methods.METHODS["gptq"] = dataclasses.replace(orig, quantize=keep)
    try:
        rdquant.compress(model, CompressConfig(bits=3, group_size=64), tokenizer=tok, calib_ids=ids,
                         progress=False, after_block=after)
    except Stop:
        pass
    finally:
        methods.METHODS["gptq"] = orig
    torch.save(saved, path)
    return saved


def split(q, parts):
    out, a = [], 0
    for rows, _ in parts:
        out.append(q.rows(a, a + rows))
        a += rows
    return out


def evaluate(stages, fn) -> tuple[list[float], float, float]:
    t0 = time.perf_counter()
    errs, bits, n = [], 0, 0
    for W, H, parts in stages:
        res, a, e = fn(W, H, parts), 0, 0.0
        for r, (rows, _) in zip(res, parts):
            e += proxy_error(W[a : a + rows], r.dequantize(), H)
            bits += 8 * sum(v.numel() * v.element_size() for v in r.packed_state().values())
            a += rows
        errs.append(e)
        n += W.numel()
    return errs, bits / n, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--part", default="1/1", help="K/N: run the K-th of N slices of the default list")
    ap.add_argument("configs", nargs="*", help="label=dict(CompressConfig fields) for method claq")
    args = ap.parse_args()
    torch.set_num_threads(1)
    stages = capture(args.blocks)
    base = evaluate(stages, lambda W, H, p: split(gptq_quantize(W, H, CompressConfig(bits=3, group_size=64))[0], p))
    rows = [("rdquant gptq 3-bit g64", base)]
    rows.append(("rdquant gptq 2-bit g64", evaluate(
        stages, lambda W, H, p: split(gptq_quantize(W, H, CompressConfig(bits=2, group_size=64))[0], p))))
    print("| variant | bits/weight (all-in) | rel. proxy error | summed error | seconds (1 thread) |\n|---|---|---|---|---|")
    for label, (errs, bpw, sec) in rows:
        print(f"| {label} | {bpw:.3f} | {sum(e / b for e, b in zip(errs, base[0])) / len(errs):.3f} | {sum(errs):.4g} | {sec:.0f} |", flush=True)
    k, n = (int(v) for v in args.part.split("/"))
    todo = args.configs or DEFAULT[(k - 1) * len(DEFAULT) // n : k * len(DEFAULT) // n]
    for spec in todo:
        label, _, kw = spec.rpartition("=dict(")
        cfg = CompressConfig(method="claq", **eval("dict(" + kw))
        errs, bpw, sec = evaluate(stages, lambda W, H, p: claq_quantize(W, H, cfg, p)[0])
        print(f"| {label} | {bpw:.3f} | {sum(e / b for e, b in zip(errs, base[0])) / len(errs):.3f} | {sum(errs):.4g} | {sec:.0f} |", flush=True)


if __name__ == "__main__":
    main()
