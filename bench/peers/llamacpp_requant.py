#!/usr/bin/env python
"""Peer baseline: llama.cpp's own quantizer writing one k-quant type everywhere (`--pure`), no imatrix, from a
GGUF whose weights are the float model's (the default model's package GGUF: rdquant's float model is that
file dequantized, and llama.cpp dequantizes it the same way before quantizing). Token embedding and output
stay 16-bit, so only the decoder linears differ from the float model. Run with a python that has
llama-cpp-python (bench/peers/README.md), by bench/kquant.py:

    LLAMA_PY bench/peers/llamacpp_requant.py SRC.gguf OUT.gguf Q3_K [--threads T]

Prints one JSON line: the quantize call's wall time and llama-cpp-python's version.
"""

from __future__ import annotations

import argparse
import json
import time
from importlib.metadata import version

FTYPE = {"Q2_K": "Q2_K", "Q3_K": "Q3_K_S", "Q4_K": "Q4_K_S", "Q5_K": "Q5_K_S", "Q6_K": "Q6_K"}  # default type = the k-quant
GGML_TYPE_F16 = 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("type", choices=tuple(FTYPE))
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{FTYPE[args.type]}")
    params.nthread = args.threads
    params.pure = True
    params.allow_requantize = True
    params.token_embedding_type = GGML_TYPE_F16
    params.output_tensor_type = GGML_TYPE_F16
    t0 = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(args.src.encode(), args.out.encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize returned {rc}")
    print(json.dumps({"wall_s": time.perf_counter() - t0, "version": version("llama-cpp-python")}))


if __name__ == "__main__":
    main()
