"""Distillation tuning (`rdquant.tune`) of a saved artifact on another machine (the lent GPU), moving only
what must travel: the tuning of `--tune-steps` needs the original model beside the compressed one, and
a whole artifact plus the original is more than one device call may carry.

    python bench/tune_remote.py split ARTIFACT DIR        # here: DIR/quant.safetensors + manifest.json
    python bench/tune_remote.py tune DIR OUT --configs 300:1e-3 [STEPS:LR ...]  # there (cuda)
    python bench/tune_remote.py merge ARTIFACT OUT/tuned_K.safetensors NEW       # here: NEW = ARTIFACT, tuned

`tune` rebuilds the compressed model from the original (the default model's GGUF, its 16-bit rest
rounded as compress does) and the carried quantized tensors, tunes once per STEPS:LR entry (from the same start), reports the
held-out KL and WikiText-2 perplexity (the quality protocol), and writes the tuned tensors (codebooks,
row scales, scales: small). `merge` writes a new artifact with them; its perplexity is then measured
here by `bench/quality.py --artifact-row` like every other row.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
TUNED = ("codebook", "codebook_range", "row_scale", "scales")  # what tuning may change


def split(artifact: Path, out: Path) -> None:
    from rdquant.artifact import read_tensors
    from rdquant.runtime import QUANT_BUFFERS

    manifest, tensors = read_tensors(artifact)
    keep = {k: v.contiguous() for k, v in tensors.items()
            if k.rpartition(".")[0] in manifest["quantized"] and k.rpartition(".")[2] in (*QUANT_BUFFERS, "bias")}
    out.mkdir(parents=True, exist_ok=True)
    save_file(keep, out / "quant.safetensors")
    (out / "manifest.json").write_text(json.dumps({k: manifest[k] for k in ("quantized", "recipe", "dense_dtype")}))
    print(f"{out}: {sum(v.numel() * v.element_size() for v in keep.values()) / 1e6:.1f} MB of quantized tensors")


def rebuild(quant_dir: Path, model_spec: str, device: str):
    """(student with QuantLinear layers, teacher = the float original, tokenizer)."""
    from rdquant.compress import round_to_storage
    from rdquant.models import load_model, set_submodule
    from rdquant.runtime import QuantLinear

    manifest = json.loads((quant_dir / "manifest.json").read_text())
    teacher, tok, _ = load_model(model_spec)
    student = copy.deepcopy(teacher)
    round_to_storage(student, getattr(torch, manifest["dense_dtype"]))
    by_layer: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(quant_dir / "quant.safetensors", framework="pt") as fh:
        for k in fh.keys():
            owner, _, leaf = k.rpartition(".")
            by_layer.setdefault(owner, {})[leaf] = fh.get_tensor(k)
    for name, info in manifest["quantized"].items():
        q = QuantLinear.from_manifest(info)
        bias = by_layer[name].pop("bias", None)
        q.set_tensors(by_layer[name])
        if bias is not None:
            q.bias.data.copy_(bias.float())
        set_submodule(student, name, q)
    return student.to(device).eval(), teacher.to(device).eval(), tok


def tune_cmd(args) -> None:
    import rdquant
    from rdquant.runtime import QuantLinear, set_dequant_cache
    from rdquant.tune import tune

    args.out.mkdir(parents=True, exist_ok=True)
    calib = safe_open(args.calib, framework="pt").get_tensor("input_ids")
    results = []
    for k, (steps, lr) in enumerate((int(c.split(":")[0]), float(c.split(":")[1])) for c in args.configs):
        student, teacher, tok = rebuild(args.quant_dir, args.model, args.device)
        if k == 0 and args.eval_untuned:
            set_dequant_cache(student, True)
            r = rdquant.evaluate(student, tok, seqlen=2048, max_windows=args.windows, device=args.device, progress=False)
            results.append({"lr": 0.0, "steps": 0, "ppl_device": r.ppl})
            print(json.dumps(results[-1]), flush=True)
        scale_bits = json.loads((args.quant_dir / "manifest.json").read_text())["recipe"].get("scale_bits", 10)
        log = tune(student, teacher, calib, steps, lr, args.batch, progress=False, scale_bits=scale_bits)
        set_dequant_cache(student, True)
        r = rdquant.evaluate(student, tok, seqlen=2048, max_windows=args.windows, device=args.device, progress=False)
        results.append({"lr": lr, "batch": args.batch, "ppl_device": r.ppl, **log.to_dict()})
        print(json.dumps(results[-1]), flush=True)
        tuned = {f"{n}.{b}": getattr(m, b).detach().cpu().contiguous() for n, m in student.named_modules()
                 if isinstance(m, QuantLinear) for b in TUNED if getattr(m, b, None) is not None}
        save_file(tuned, args.out / f"tuned_{k}.safetensors")
        (args.out / f"tuned_{k}.json").write_text(json.dumps(results[-1]))
        del student, teacher
    (args.out / "tune_results.json").write_text(json.dumps(results, indent=1))


def merge(artifact: Path, tuned_file: Path, new: Path) -> None:
    import shutil

    from rdquant.artifact import MANIFEST, read_tensors, write_artifact

    manifest, tensors = read_tensors(artifact)
    with safe_open(tuned_file, framework="pt") as fh:
        for k in fh.keys():
            if k not in tensors or tensors[k].shape != fh.get_tensor(k).shape:
                raise SystemExit(f"{k}: not a tensor of {artifact} with that shape")
            tensors[k] = fh.get_tensor(k)
    keep = {k: v for k, v in manifest.items() if k not in ("format", "format_version", "files", "tensors")}
    log = tuned_file.with_suffix(".json")
    if log.is_file():
        keep["tuning"] = json.loads(log.read_text())
    extras = [f for f in artifact.iterdir() if f.is_file() and f.name != MANIFEST and not f.name.endswith(".safetensors")]
    write_artifact(new, tensors, keep, {f.name: (lambda d, f=f: shutil.copy2(f, Path(d) / f.name)) for f in extras}, overwrite=True)
    print(f"wrote {new}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split")
    s.add_argument("artifact", type=Path)
    s.add_argument("out", type=Path)
    t = sub.add_parser("tune")
    t.add_argument("quant_dir", type=Path)
    t.add_argument("out", type=Path)
    t.add_argument("--model", default="smollm2-135m")
    t.add_argument("--calib", type=Path, default=ROOT / "bench" / "cache" / "calib_c4_128x512_seed0.safetensors")
    t.add_argument("--configs", nargs="+", default=["300:1e-3"], metavar="STEPS:LR", help="one tuning run per entry")
    t.add_argument("--batch", type=int, default=4)
    t.add_argument("--windows", type=int, default=32)
    t.add_argument("--device", default="cuda")
    t.add_argument("--eval-untuned", action="store_true")
    m = sub.add_parser("merge")
    m.add_argument("artifact", type=Path)
    m.add_argument("tuned", type=Path)
    m.add_argument("new", type=Path)
    args = ap.parse_args()
    if args.cmd == "split":
        split(args.artifact, args.out)
    elif args.cmd == "tune":
        tune_cmd(args)
    else:
        merge(args.artifact, args.tuned, args.new)


if __name__ == "__main__":
    main()
