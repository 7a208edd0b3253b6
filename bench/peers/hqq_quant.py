#!/usr/bin/env python
"""Peer baseline: HQQ (Half-Quadratic Quantization, calibration-free, weight-only).

Run with the *bench* virtual environment (see bench/peers/README.md), never the
main one:

    .venv-bench/bin/python bench/peers/hqq_quant.py \
        --model HF_DIR --bits 4 --group-size 64 --out OUTDIR \
        [--compute-dtype float16|bfloat16|float32] [--threads T]

Every nn.Linear inside model.layers.* is replaced by ``hqq.core.quantize.HQQLinear``
built from ``BaseQuantizeConfig(nbits=B, group_size=G)``; everything else in the
config is HQQ's default (axis=1, quant_zero=False, quant_scale=False,
offload_meta=False, view_as_float=False, optimize=True, round_zero=(B == 4),
proximal solver ``optimize_weights_proximal_legacy`` with lp_norm=0.7, beta=10,
kappa=1.01, iters=20 with early stop). ``compute_dtype`` defaults to HQQ's own default
(float16), which is also the dtype scale/zero are stored in. lm_head and embeddings
are left alone (that is also what HQQ's model-level API does).

Outputs in OUTDIR:
  hqq_state.safetensors     the HQQLinear state dicts (HQQ's own safetensors-compatible
                            encoding: W_q packed codes, scale, zero, encoded meta scalars)
  dequantized.safetensors   "<module>.weight" float32 for every quantized Linear,
                            = HQQLinear.dequantize() (computed in compute_dtype) cast to float32
  result.json               timings, sizes, settings, sanity checks
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from importlib.metadata import version as pkg_version
from pathlib import Path

import torch
from safetensors.torch import save_file


DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

LOAD0 = None  # 1-min load average at start (timings are only meaningful on an idle machine)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="float HF checkpoint directory")
    p.add_argument("--bits", type=int, required=True, help="HQQ nbits (8, 4, 3, 2, 1)")
    p.add_argument("--group-size", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--compute-dtype", default="float16", choices=sorted(DTYPES),
                   help="HQQLinear compute_dtype (HQQ default float16); scale/zero are stored in it")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch default)")
    return p.parse_args()


def tensor_bytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def main() -> int:
    global LOAD0
    LOAD0 = os.getloadavg()[0]
    args = parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    compute_dtype = DTYPES[args.compute_dtype]

    from transformers import AutoModelForCausalLM
    import hqq
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear, Quantizer

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, device_map=None)
    model.eval()
    lin_names = [
        n for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")
    ]
    if not lin_names:
        raise SystemExit("no nn.Linear found under model.layers.*")
    orig_w = {n: model.get_submodule(n).weight.detach().clone() for n in lin_names}

    quant_config = BaseQuantizeConfig(nbits=args.bits, group_size=args.group_size)
    config_used = copy.deepcopy(quant_config)

    # ---------------- the timed part: HQQLinear construction == quantization -------
    qlayers: dict[str, HQQLinear] = {}
    wall = 0.0
    with torch.no_grad():
        for n in lin_names:
            lin = model.get_submodule(n)
            t0 = time.perf_counter()
            ql = HQQLinear(lin, quant_config=quant_config, compute_dtype=compute_dtype,
                           device="cpu", del_orig=True)
            wall += time.perf_counter() - t0
            parent_name, child = n.rsplit(".", 1)
            setattr(model.get_submodule(parent_name), child, ql)
            qlayers[n] = ql
    print(f"HQQ quantization wall time: {wall:.2f} s ({len(qlayers)} linears)", flush=True)

    # ---------------- sizes from the actual quantized tensors -----------------------
    breakdown = {"W_q": 0, "scale": 0, "zero": 0, "other_meta": 0}
    state: dict[str, torch.Tensor] = {}
    wq_dtype = scale_dtype = zero_dtype = None
    wq_shape_example = scale_shape_example = None
    for n, ql in qlayers.items():
        sd = ql.state_dict()  # HQQ's own (safetensors-encoded) serialization
        for k, v in sd.items():
            if not isinstance(v, torch.Tensor):
                continue
            state[f"{n}.{k}"] = v.detach().contiguous()
            b = tensor_bytes(v)
            if k in ("W_q", "scale", "zero"):
                breakdown[k] += b
            else:
                breakdown["other_meta"] += b
        wq_dtype, scale_dtype, zero_dtype = str(ql.W_q.dtype), str(ql.meta["scale"].dtype), str(ql.meta["zero"].dtype)
        wq_shape_example = [n, list(ql.W_q.shape)]
        scale_shape_example = list(ql.meta["scale"].shape)
    save_file(state, str(out / "hqq_state.safetensors"))
    quantized_linear_bytes = sum(breakdown.values())
    core_bytes = breakdown["W_q"] + breakdown["scale"] + breakdown["zero"]

    # ---------------- dequantize -> float32 -----------------------------------------
    deq: dict[str, torch.Tensor] = {}
    checks = {"max_levels_per_group": 0, "n_identical_to_original": 0, "codes_min": None, "codes_max": None}
    per_layer_rel = {}
    num = den = 0.0
    n_params = 0
    G = args.group_size
    with torch.no_grad():
        for n, ql in qlayers.items():
            w = ql.dequantize().to(torch.float32).contiguous()
            o = orig_w[n]
            assert w.shape == o.shape, (n, w.shape, o.shape)
            deq[f"{n}.weight"] = w
            n_params += w.numel()
            out_f, in_f = w.shape
            if in_f % G == 0:
                g = w.reshape(out_f, in_f // G, G)
                srt = g.sort(dim=-1).values
                levels = 1 + (srt[..., 1:] != srt[..., :-1]).sum(-1)
                checks["max_levels_per_group"] = max(checks["max_levels_per_group"], int(levels.max()))
            if torch.equal(w, o):
                checks["n_identical_to_original"] += 1
            e2 = (w - o).pow(2).sum().item()
            o2 = o.pow(2).sum().item()
            per_layer_rel[n] = (e2 / o2) ** 0.5
            num += e2
            den += o2
        n0 = next(iter(qlayers))
        codes = Quantizer.unpack[qlayers[n0].meta["packing"]](qlayers[n0].W_q, dtype=torch.int32)
        checks["codes_min"], checks["codes_max"] = int(codes.min()), int(codes.max())
    save_file(deq, str(out / "dequantized.safetensors"))
    checks["rel_weight_mse_vs_original"] = num / den
    checks["rel_frobenius_error_total"] = (num / den) ** 0.5
    sample = [n for n in lin_names if n.startswith(("model.layers.0.", "model.layers.15.", "model.layers.29."))]
    checks["rel_frobenius_error_sample"] = {n: per_layer_rel[n] for n in sample}
    checks["n_quantized_modules"] = len(qlayers)

    result = {
        "tool": "hqq",
        "version": pkg_version("hqq"),
        "hqq_module_version": getattr(hqq, "__version__", None),
        "transformers_version": pkg_version("transformers"),
        "torch_version": torch.__version__,
        "bits": args.bits,
        "group_size": args.group_size,
        "compute_dtype": args.compute_dtype,
        "quant_config": json.loads(json.dumps(config_used, default=str)),
        "solver": "optimize_weights_proximal_legacy(lp_norm=0.7, beta=10, kappa=1.01, iters=20, early stop)",
        "packing": qlayers[n0].meta["packing"],
        "W_q_dtype": wq_dtype,
        "W_q_shape_example": wq_shape_example,
        "scale_dtype": scale_dtype,
        "zero_dtype": zero_dtype,
        "scale_shape_example": scale_shape_example,
        "wall_time_s": wall,
        "threads": torch.get_num_threads(),
        "loadavg_1m_before_after": [LOAD0, os.getloadavg()[0]],
        "cpu_count": os.cpu_count(),
        "quantized_linear_bytes": quantized_linear_bytes,
        "quantized_linear_bytes_breakdown": breakdown,
        "quantized_linear_core_bytes": core_bytes,
        "hqq_state_file_bytes": (out / "hqq_state.safetensors").stat().st_size,
        "n_quantized_params": n_params,
        "bits_per_quantized_param": 8 * quantized_linear_bytes / n_params,
        "bits_per_quantized_param_core": 8 * core_bytes / n_params,
        "checks": checks,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
