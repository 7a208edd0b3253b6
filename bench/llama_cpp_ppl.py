"""Perplexity of a GGUF file in llama.cpp (llama-cpp-python) on given token windows, the same
definition as rdquant.evaluate: every window scored from its first token, the NLL of tokens 2..L
summed over all windows. Runs in its own environment (llama-cpp-python is a ~10-minute source build:
README, bench extra); needs only numpy and llama_cpp.

    python bench/llama_cpp_ppl.py MODEL.gguf WINDOWS.npy [--threads 2]   # prints one JSON line
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf")
    ap.add_argument("windows", help=".npy of int token ids [n_windows, seqlen]")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from llama_cpp import Llama

    windows = np.load(args.windows)
    n, L = windows.shape
    llm = Llama(model_path=args.gguf, n_ctx=L, n_batch=512, logits_all=True, n_threads=args.threads, verbose=False)
    total, t0 = 0.0, time.perf_counter()
    first_logits = None
    for w in windows:
        llm.reset()
        llm.eval(w.tolist())
        logits = np.asarray(llm.scores[:L], dtype=np.float64)
        if first_logits is None:
            first_logits = logits[:8, :8].tolist()
        m = logits.max(-1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
        total -= float(logp[np.arange(L - 1), w[1:]].sum())
    nll = total / (n * (L - 1))
    print(json.dumps({"ppl": math.exp(nll), "nll": nll, "windows": n, "seqlen": L, "seconds": time.perf_counter() - t0,
                      "first_logits": first_logits}))


if __name__ == "__main__":
    main()
