#!/usr/bin/env python
"""Peer baseline: llama.cpp's own quantizer, a file type's mix (Q3_K_M, ...) or with `--pure` its one k-quant
everywhere, no imatrix, from a
GGUF whose weights are the float model's (the default model's package GGUF: rdquant's float model is that
file dequantized, and llama.cpp dequantizes it the same way before quantizing). Token embedding and output
stay 16-bit (unless --own-vocab), so only the decoder linears differ from the float model. Run with a python that has
llama-cpp-python (bench/peers/README.md), by bench/kquant.py:

    LLAMA_PY bench/peers/llamacpp_requant.py SRC.gguf OUT.gguf Q3_K_M [--pure] [--threads T]

Prints one JSON line: the quantize call's wall time and llama-cpp-python's version.
"""

from __future__ import annotations

import argparse
import json
import time
from importlib.metadata import version

FTYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K")  # _S: its k-quant when pure
GGML_TYPE_F16 = 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("ftype", choices=FTYPES)
    ap.add_argument("--pure", action="store_true", help="every tensor the file type's base k-quant (no mix rules)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--own-vocab", action="store_true", help="token embedding / output as the file type's rules set "
                    "them (default: 16-bit, so only the decoder linears are quantized)")
    args = ap.parse_args()
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{args.ftype}")
    params.nthread = args.threads
    params.pure = args.pure
    params.allow_requantize = True
    if not args.own_vocab:
        params.token_embedding_type = GGML_TYPE_F16
        params.output_tensor_type = GGML_TYPE_F16
    t0 = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(args.src.encode(), args.out.encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize returned {rc}")
    print(json.dumps({"wall_s": time.perf_counter() - t0, "version": version("llama-cpp-python")}))


if __name__ == "__main__":
    main()
