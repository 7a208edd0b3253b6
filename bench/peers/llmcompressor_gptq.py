#!/usr/bin/env python
"""Peer baseline: llm-compressor GPTQ (weight-only, integer, asymmetric, grouped).

Run with the *bench* virtual environment (see bench/peers/README.md), never the
main one:

    .venv-bench/bin/python bench/peers/llmcompressor_gptq.py \
        --model HF_DIR --calib CALIB.safetensors --bits 3 --group-size 64 \
        --out OUTDIR [--dampening 0.01] [--actorder default|none|static|weight]

CALIB.safetensors must hold one int64 tensor ``input_ids`` of shape [N, L]
(already tokenized windows). They are fed verbatim to ``oneshot`` as a
pre-tokenized ``datasets.Dataset`` (llm-compressor skips tokenization when an
``input_ids`` column is present), batch size 1, no shuffling.

Outputs in OUTDIR:
  compressed/               llm-compressor's normal compressed save (pack-quantized)
  dequantized.safetensors   "<module>.weight" float32 for every quantized Linear,
                            decoded from the *stored* packed codes/scales/zero points
  result.json               timings, sizes, settings, sanity checks
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from importlib.metadata import version as pkg_version
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="float HF checkpoint directory")
    p.add_argument("--calib", required=True, help="safetensors file with int64 input_ids [N, L]")
    p.add_argument("--bits", type=int, required=True)
    p.add_argument("--group-size", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dampening", type=float, default=0.01, help="GPTQ dampening_frac (llm-compressor default 0.01)")
    p.add_argument(
        "--actorder",
        default="default",
        choices=["default", "none", "static", "weight", "group"],
        help="'default' = leave llm-compressor's default (static == weight in >=0.14). "
        "'group' (dynamic) was removed from compressed-tensors 0.19 and is rejected.",
    )
    p.add_argument("--block-size", type=int, default=128, help="GPTQ block_size (llm-compressor default 128)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch default)")
    p.add_argument("--ignore", nargs="*", default=["lm_head"], help="module names/classes to skip")
    return p.parse_args()


def build_recipe(args):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.gptq import GPTQModifier

    weights = QuantizationArgs(
        num_bits=args.bits,
        type="int",
        symmetric=False,
        strategy="group",
        group_size=args.group_size,
    )
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)  # A16: no activation quant
    kw = dict(
        config_groups={"group_0": scheme},
        ignore=list(args.ignore),
        dampening_frac=args.dampening,
        block_size=args.block_size,
    )
    if args.actorder == "group":
        raise SystemExit("actorder='group' (dynamic) is not supported by this llm-compressor/compressed-tensors version")
    if args.actorder == "none":
        kw["actorder"] = None
    elif args.actorder in ("static", "weight"):
        kw["actorder"] = args.actorder
    # "default": do not pass -> GPTQModifier's own default
    return GPTQModifier(**kw)


def safetensors_bytes(d: Path) -> tuple[int, dict[str, int]]:
    """Total on-disk bytes of *.safetensors in d, and tensor-payload bytes per tensor name."""
    total = 0
    per_tensor: dict[str, int] = {}
    for f in sorted(d.glob("*.safetensors")):
        total += f.stat().st_size
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                sl = fh.get_slice(k)
                n = 1
                for s in sl.get_shape():
                    n *= s
                per_tensor[k] = n * torch.empty((), dtype=_st_dtype(sl.get_dtype())).element_size()
    return total, per_tensor


def _st_dtype(s: str) -> torch.dtype:
    return {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
        "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
    }[s]


def load_compressed_state(d: Path) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


def main() -> int:
    args = parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    import llmcompressor
    from llmcompressor import oneshot
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization.utils import calculate_range

    # ---------------- calibration windows (verbatim, no re-tokenization) -------------
    calib = load_file(args.calib)
    if "input_ids" not in calib:
        raise SystemExit(f"{args.calib}: no 'input_ids' tensor (keys: {list(calib)})")
    ids = calib["input_ids"]
    if ids.dtype != torch.int64 or ids.ndim != 2:
        raise SystemExit(f"input_ids must be int64 [N, L], got {ids.dtype} {tuple(ids.shape)}")
    n_samples, seqlen = map(int, ids.shape)
    ds = Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
    )

    # ---------------- model (float32, CPU) ------------------------------------------
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, device_map=None)
    model.eval()
    lin_names = [
        n for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.split(".")[-1] not in args.ignore and n not in args.ignore
    ]
    orig_w = {n: model.get_submodule(n).weight.detach().clone() for n in lin_names}
    bad_g = sorted({m.in_features for n in lin_names for m in [model.get_submodule(n)] if m.in_features % args.group_size})
    if bad_g:
        print(f"WARNING: in_features {bad_g} not divisible by group_size={args.group_size}", file=sys.stderr)

    recipe = build_recipe(args)

    # ---------------- the timed call ------------------------------------------------
    t0 = time.perf_counter()
    model = oneshot(
        model=model,
        dataset=ds,
        recipe=recipe,
        num_calibration_samples=n_samples,
        max_seq_length=seqlen,
        batch_size=1,
        shuffle_calibration_samples=False,
        output_dir=None,
    )
    wall = time.perf_counter() - t0
    print(f"oneshot wall time: {wall:.2f} s", flush=True)

    # ---------------- collect in-memory results before saving ----------------------
    qmods = {}
    for n, m in model.named_modules():
        sch = getattr(m, "quantization_scheme", None)
        if sch is not None and getattr(sch, "weights", None) is not None and hasattr(m, "weight_scale"):
            qmods[n] = m
    if not qmods:
        raise SystemExit("no quantized modules found after oneshot")
    any_scheme = next(iter(qmods.values())).quantization_scheme
    resolved_actorder = any_scheme.weights.actorder
    resolved_actorder = getattr(resolved_actorder, "value", resolved_actorder)
    mem_w = {n: m.weight.detach().to(torch.float32).clone() for n, m in qmods.items()}
    schemes = {n: m.quantization_scheme.model_copy(deep=True) for n, m in qmods.items()}
    scale_dtype = str(next(iter(qmods.values())).weight_scale.dtype)
    zp_dtype = str(next(iter(qmods.values())).weight_zero_point.dtype)

    # ---------------- normal compressed save ---------------------------------------
    cdir = out / "compressed"
    model.save_pretrained(str(cdir), save_compressed=True)
    del model
    gc.collect()

    total_bytes, per_tensor = safetensors_bytes(cdir)
    qsuffixes = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")
    breakdown = {s: 0 for s in qsuffixes}
    for k, b in per_tensor.items():
        for s in qsuffixes:
            if k.endswith("." + s) and k.rsplit(".", 1)[0] in qmods:
                breakdown[s] += b
    quantized_linear_bytes = sum(breakdown.values())

    # ---------------- decode the stored codes -> dequantized float weights ----------
    sd = load_compressed_state(cdir)
    deq: dict[str, torch.Tensor] = {}
    qmin, qmax = calculate_range(any_scheme.weights, "cpu")
    checks = {"max_levels_per_group": 0, "max_abs_diff_vs_inmemory_weight": 0.0,
              "codes_min": None, "codes_max": None, "n_identical_to_original": 0}
    num = den = 0.0
    n_params = 0
    G = args.group_size
    for n in qmods:
        local = {s: sd[f"{n}.{s}"] for s in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
                 if f"{n}.{s}" in sd}
        if "weight_packed" not in local:
            raise SystemExit(f"{n}: no weight_packed in compressed checkpoint (keys: {[k for k in sd if k.startswith(n + '.')]})")
        w = PackedQuantizationCompressor.decompress(local, schemes[n])["weight"].to(torch.float32)
        deq[f"{n}.weight"] = w.contiguous()
        n_params += w.numel()
        # sanity checks
        checks["max_abs_diff_vs_inmemory_weight"] = max(
            checks["max_abs_diff_vs_inmemory_weight"], (w - mem_w[n]).abs().max().item())
        out_f, in_f = w.shape
        if in_f % G == 0:
            g = w.reshape(out_f, in_f // G, G)
            srt = g.sort(dim=-1).values
            levels = 1 + (srt[..., 1:] != srt[..., :-1]).sum(-1)
            checks["max_levels_per_group"] = max(checks["max_levels_per_group"], int(levels.max()))
        o = orig_w[n]
        if torch.equal(w, o):
            checks["n_identical_to_original"] += 1
        num += (w - o).pow(2).sum().item()
        den += o.pow(2).sum().item()
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    # code range check on one module
    n0 = next(iter(qmods))
    codes = unpack_from_int32(sd[f"{n0}.weight_packed"], args.bits, sd[f"{n0}.weight_shape"])
    checks["codes_min"], checks["codes_max"] = int(codes.min()), int(codes.max())
    checks["qrange"] = [float(qmin), float(qmax)]
    checks["rel_weight_mse_vs_original"] = num / den
    checks["n_quantized_modules"] = len(qmods)
    checks["n_original_linears_expected"] = len(lin_names)
    save_file(deq, str(out / "dequantized.safetensors"))

    result = {
        "tool": "llmcompressor",
        "version": llmcompressor.__version__ if hasattr(llmcompressor, "__version__") else pkg_version("llmcompressor"),
        "compressed_tensors_version": pkg_version("compressed-tensors"),
        "transformers_version": pkg_version("transformers"),
        "torch_version": torch.__version__,
        "bits": args.bits,
        "group_size": args.group_size,
        "symmetric": False,
        "actorder": resolved_actorder,
        "actorder_arg": args.actorder,
        "dampening": args.dampening,
        "block_size": args.block_size,
        "n_samples": n_samples,
        "seqlen": seqlen,
        "wall_time_s": wall,
        "torch_threads": torch.get_num_threads(),
        "compressed_bytes": total_bytes,
        "quantized_linear_bytes": quantized_linear_bytes,
        "quantized_linear_bytes_breakdown": breakdown,
        "scale_dtype": scale_dtype,
        "zero_point_dtype_in_memory": zp_dtype,
        "n_quantized_params": n_params,
        "bits_per_quantized_param": 8 * quantized_linear_bytes / n_params,
        "checks": checks,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
