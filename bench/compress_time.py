"""Compress wall time alone (no evaluation), for timing on an otherwise idle machine.

    python bench/compress_time.py --bits 3            # rdquant GPTQ, group 64, 128 x 512 C4 tokens
    python bench/compress_time.py --method claq --target-bits 3.1

Same model, settings and calibration windows as bench/quality.py; the artifact is not saved.
"""

from __future__ import annotations

import argparse
import time

import torch
from safetensors.torch import load_file

import rdquant
from rdquant.models import load_model

from quality import calib_file  # noqa: E402  (run as a script: bench/ is on sys.path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--target-bits", type=float, default=None, help="claq: all-in bits per weight")
    ap.add_argument("--reuse-activations", type=int, default=1)
    args = ap.parse_args()
    model, tok, mid = load_model(args.model)
    ids = load_file(calib_file(tok, 128, 512, 0))["input_ids"]
    cfg = rdquant.CompressConfig(method=args.method, bits=args.bits, group_size=args.group_size,
                                 target_bits=args.target_bits, reuse_activations=bool(args.reuse_activations))
    t0 = time.perf_counter()
    rdquant.compress(model, cfg, tokenizer=tok, calib_ids=ids, model_id=mid)
    what = f"target {args.target_bits} bits/weight" if args.target_bits else f"{args.bits}-bit g{args.group_size}"
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"{args.method} {what} reuse={bool(args.reuse_activations)}: "
          f"compress {time.perf_counter() - t0:.1f} s on {torch.get_num_threads()} threads, peak host RSS {rss:.2f} GiB")


if __name__ == "__main__":
    main()
