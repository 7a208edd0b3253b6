"""Greedy generation speed and weight memory: the original model against an rdquant artifact with each
runtime (`reference`: dequantize on every call; `cached`: dequantized weights kept; the kernels that
run on the device: `int4-cpu` on the CPU, `triton` on a GPU), with whether each runtime's greedy tokens
equal the reference runtime's. Prints a table and writes its rows to
bench/results/generation.json (rows of the same device/model/artifact/runtime are replaced).

    python bench/generate_speed.py --artifact artifacts/smollm2-135m-gptq-w4g64 [--device cpu] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from datetime import date
from pathlib import Path

import torch

import rdquant
from rdquant import backends
from rdquant.runtime import QuantLinear

RESULTS = Path(__file__).parent / "results" / "generation.json"


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes the weights take in memory: parameters and buffers (tied ones once), plus any dequantized
    weights a QuantLinear keeps."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    total += sum(m._cache.numel() * m._cache.element_size() for m in model.modules()
                 if isinstance(m, QuantLinear) and m._cache is not None)
    for m in model.modules():  # a kernel's repacked form (its stored tensors are counted above)
        if isinstance(m, QuantLinear) and m._kernel is not None:
            for v in vars(m._kernel).values():
                for t in v if isinstance(v, (list, tuple)) else [v]:
                    if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
                        seen.add(t.data_ptr())
                        total += t.numel() * t.element_size()
    return total


@torch.inference_mode()
def tokens_per_s(model, tok, prompt: str, new_tokens: int, device: str, repeats: int) -> tuple[float, list[int]]:
    enc = tok(prompt, return_tensors="pt").to(device)
    kw = dict(do_sample=False, pad_token_id=tok.eos_token_id, min_new_tokens=new_tokens, max_new_tokens=new_tokens)
    model.generate(**enc, **{**kw, "min_new_tokens": 8, "max_new_tokens": 8})  # warm-up (and fills a cache)
    times, out = [], None
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(**enc, **kw)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return new_tokens / times[len(times) // 2], out[0, enc["input_ids"].shape[1]:].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--model", default="smollm2-135m", help="the original, as --model names it")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="timed generations per row (median)")
    ap.add_argument("--prompt", default="The history of the city begins")
    args = ap.parse_args()
    command = "python bench/generate_speed.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    machine = (torch.cuda.get_device_name() if args.device.startswith("cuda")
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    tok = rdquant.load_tokenizer(args.artifact)
    rows = []
    original = rdquant.load_original(args.model, device=args.device)
    speed, ref_tokens = tokens_per_s(original, tok, args.prompt, args.new_tokens, args.device, args.repeats)
    rows.append(("original (fp32)", speed, weight_bytes(original), True))
    del original
    dev = torch.device(args.device)
    kernels = [k for k in backends.KERNELS if backends.kernel_runs_on(k, dev) and backends.fast_on(k, dev)]
    rows[0] = rows[0][:3] + (None,)
    for runtime in ["reference", "cached"] + kernels:  # greedy tokens compared with the reference runtime's
        model = rdquant.load(args.artifact, device=args.device, backend=runtime)
        speed, tokens = tokens_per_s(model, tok, args.prompt, args.new_tokens, args.device, args.repeats)
        ref_tokens = tokens if runtime == "reference" else ref_tokens
        rows.append((f"rdquant, {runtime} runtime", speed, weight_bytes(model), tokens == ref_tokens))
        del model
    base_speed, base_bytes = rows[0][1], rows[0][2]
    print(f"{'model':32} {'tokens/s':>9} {'x orig':>7} {'weight MiB':>11} {'x orig':>7}  same tokens as reference")
    out = []
    for name, speed, nbytes, same in rows:
        print(f"{name:32} {speed:9.2f} {speed / base_speed:7.2f} {nbytes / 2**20:11.1f} {nbytes / base_bytes:7.2f}  {same}")
        out.append({"device": args.device, "machine": machine, "model": args.model, "artifact": Path(args.artifact).name,
                    "runtime": name, "new_tokens": args.new_tokens, "tokens_per_s": round(speed, 2),
                    "speed_vs_original": round(speed / base_speed, 2), "weight_mib": round(nbytes / 2**20, 1),
                    "memory_vs_original": round(nbytes / base_bytes, 2), "same_tokens_as_reference": same,
                    "date": date.today().isoformat(),
                    "command": command, "source": "bench/generate_speed.py"})
    old = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"rows": []}
    key = lambda r: (r.get("device"), r.get("model"), r.get("artifact"), r.get("runtime"))
    new_keys = {key(r) for r in out}
    old["rows"] = [r for r in old["rows"] if key(r) not in new_keys] + out
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(old, indent=1) + "\n")
    print(f"rows written to {RESULTS}")


if __name__ == "__main__":
    main()
