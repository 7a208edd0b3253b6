"""Lossless coding of the quantized artifacts: sizes, entropy floor, decode speed, load time.

    python bench/codecs.py                 # the GPTQ / CLAQ / CVXQ artifacts in bench/cache/artifacts
    (made by: python bench/quality.py --bits 4 3 2 --methods gptq; ... --bits 2 --methods gptq
     --gptq-extra scale_bits=7; ... --methods claq --claq-targets 3.1 [--claq-extra claq_entropy_lambda=0.7];
     rdquant compress --method cvxq --target-bits 3.0 --solver rtn --sensitivity hessian [--rate coded]
     --out bench/cache/artifacts/cvxq_rtn_t3.0g128_hessian[_ratecoded], then recode --codec none if coded)
    python bench/codecs.py --artifacts DIR [DIR ...]

For each artifact: the packed size of the quantized linears, the same after zstd-19 / lz4 / ANS /
auto coding, and the empirical-entropy floor (sum over layers of H(symbols) * n + side information).
Decode throughput is millions of decoded codes (weights) per second over the `qweight` payloads,
one thread, the whole decode path (= MB/s at one byte per code), then all tensors with the loader's
thread pool. Load time is files -> ready model via
rdquant.load, warm (page cache) and cold (pages dropped with posix_fadvise), against the 16-bit
safetensors original loaded with transformers. Coded artifacts decode to the same bytes (checked by
sha256 on load), so their perplexity is the packed artifact's (bench/quality.py).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import rdquant
from rdquant.artifact import read_manifest, read_tensors
from rdquant.coding import recode
from rdquant.report import decode_speeds

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / "cache"
CODECS = ["zstd-19", "lz4", "ans", "auto", "auto+dense"]  # +dense: the 16-bit tensors coded too


def drop_cache(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def timed_load(fn, path: Path, repeats: int = 5, cold_repeats: int = 3) -> tuple[float, float]:
    """(cold, warm) seconds: cold = median of `cold_repeats` loads each after dropping the files' pages,
    warm = best of `repeats`."""
    cold = []
    for _ in range(cold_repeats):
        drop_cache(path)
        t0 = time.perf_counter()
        fn(path)
        cold.append(time.perf_counter() - t0)
    warm = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(path)
        warm.append(time.perf_counter() - t0)
    return sorted(cold)[len(cold) // 2], min(warm)


def entropy_floor_bytes(packed: Path) -> float:
    """Bytes if every qweight were coded at its empirical entropy (order 0, or per zero-point context when
    lower; a codebook or mixed-width layer's codes with one table per width), the layer's other tensors
    as packed."""
    manifest, tensors = read_tensors(packed, verify=False)
    from rdquant.coding import (LayerInfo, _codebook_symbols, _column_width_map, _mixed_width_map, _width_entropy_bits,
                                best_mapping, context_entropy_bits, weight_symbols)
    from rdquant.qmixed import unpack_by_width

    total = 0.0
    for name, info in manifest["quantized"].items():
        qw = tensors[f"{name}.qweight"]
        if info.get("layout") == "codebook":
            w = tensors[f"{name}.widths"]
            h = _width_entropy_bits(_codebook_symbols(qw, w, info), _column_width_map(w, info))
        elif info.get("layout") == "mixed":
            wmap = _mixed_width_map(tensors, name, info)
            h = _width_entropy_bits(unpack_by_width(qw, wmap).reshape(-1).numpy(), wmap.numpy())
        else:
            li, qz = LayerInfo.from_manifest(info), tensors.get(f"{name}.qzeros")
            _, _, h = best_mapping(qw, qz, li)
            if qz is not None:  # the zero point as context (mapping zero-context)
                h = min(h, context_entropy_bits(weight_symbols(qw, qz, li, "raw"), li, qz))
        total += h * info["shape"][0] * info["shape"][1] / 8
        total += sum(t.numel() * t.element_size() for k, t in tensors.items()
                     if k.rpartition(".")[0] == name and not k.endswith(".qweight"))
    return total


def original_16bit(model: str) -> Path:
    """A 16-bit safetensors copy of the original (what a user would otherwise ship)."""
    path = CACHE / "original16"
    if not (path / "model.safetensors").is_file():
        from rdquant.models import load_model

        m, tok, _ = load_model(model)
        m.half().save_pretrained(path)
        tok.save_pretrained(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path, nargs="+",
                    default=[CACHE / "artifacts" / n for n in ("gptq_w4g64", "gptq_w3g64", "gptq_w2g64",
                                                                       "gptq_w2g64_scale_bits7", "claq_t3.1",
                                                                       "claq_t3.1_entropy_lambda0.7",
                                                                       "cvxq_rtn_t3.0g128_hessian",
                                                                       "cvxq_rtn_t3.0g128_hessian_ratecoded")],
                    help="packed artifacts (docs/notes/benchmarks-lab.md section 3 says how each default was made)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--json", type=Path, default=CACHE / "codecs.json")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    from transformers import AutoModelForCausalLM

    orig = original_16bit(args.model)
    orig_cold, orig_warm = timed_load(lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32), orig)
    rows = []
    for packed in args.artifacts:
        if not packed.is_dir():
            print(f"skip {packed}: run bench/quality.py first")
            continue
        rep = rdquant.inspect(packed)
        row = {"artifact": packed.name, "params": rep.quantized_params, "packed_bytes": rep.quantized_bytes,
               "entropy_floor_bytes": entropy_floor_bytes(packed), "total_packed_bytes": rep.total_bytes}
        row["load_packed"] = timed_load(rdquant.load, packed)
        ref = rdquant.load(packed)
        x = torch.arange(1, 257).unsqueeze(0)
        with torch.no_grad():
            ref_logits = ref(x).logits
        for codec in CODECS:
            out = CACHE / "coded" / f"{packed.name}-{codec}"
            recode(packed, out, codec=codec.removesuffix("+dense"), dense=codec.endswith("+dense"), overwrite=True)
            crep = rdquant.inspect(out)
            t0 = time.perf_counter()
            read_tensors(out)
            parallel = time.perf_counter() - t0
            with torch.no_grad():
                same = torch.equal(rdquant.load(out)(x).logits, ref_logits)
            row[codec] = {"bytes": crep.quantized_stored_bytes, "total_bytes": crep.total_bytes,
                          "decode_mbps_1thread": decode_speeds(out, read_manifest(out))[1], "read_all_s": parallel,
                          "load": timed_load(rdquant.load, out), "identical_logits": same}
        rows.append(row)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"original16": [orig_cold, orig_warm], "rows": rows}, indent=1))

    print(f"\n16-bit original (safetensors, transformers): load cold {orig_cold:.2f} s, warm {orig_warm:.2f} s\n")
    print("| artifact | packed MB | entropy floor | " + " | ".join(CODECS) + " |")
    print("|---|---|---|" + "---|" * len(CODECS))
    for r in rows:
        pk = r["packed_bytes"]
        cells = [f"{r[c]['bytes'] / 1e6:.2f} MB ({100 * (1 - r[c]['bytes'] / pk):.1f}%)" for c in CODECS]
        floor = r["entropy_floor_bytes"]
        print(f"| {r['artifact']} | {pk / 1e6:.2f} | {floor / 1e6:.2f} MB ({100 * (1 - floor / pk):.1f}%) | " + " | ".join(cells) + " |")
    print("\n(quantized linears, all side information included; % = saved vs packed)\n")
    print("| artifact | whole artifact packed MB | " + " | ".join(CODECS) + " |")
    print("|---|---|" + "---|" * len(CODECS))
    for r in rows:
        tp = r["total_packed_bytes"]
        cells = [f"{r[c]['total_bytes'] / 1e6:.2f} MB ({100 * (1 - r[c]['total_bytes'] / tp):.1f}%)" for c in CODECS]
        print(f"| {r['artifact']} | {tp / 1e6:.2f} | " + " | ".join(cells) + " |")
    print()
    print("| artifact | codec | bpw packed -> coded | decode M codes/s (1 thread) | read+decode all s | load cold / warm s (packed: cold / warm) | coded / packed load, cold / warm | identical logits |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        for c in CODECS:
            d = r[c]
            sp = "-" if d["decode_mbps_1thread"] is None else f"{d['decode_mbps_1thread']:.0f}"
            print(f"| {r['artifact']} | {c} | {8 * r['packed_bytes'] / r['params']:.3f} -> {8 * d['bytes'] / r['params']:.3f} | "
                  f"{sp} | {d['read_all_s']:.2f} | {d['load'][0]:.2f} / {d['load'][1]:.2f} "
                  f"({r['load_packed'][0]:.2f} / {r['load_packed'][1]:.2f}) | "
                  f"{d['load'][0] / r['load_packed'][0]:.2f}x / {d['load'][1] / r['load_packed'][1]:.2f}x | {d['identical_logits']} |")


if __name__ == "__main__":
    main()
