"""GPU decode with the quantized KV cache (issue 23): Llama-3-8B shape (32 query / 8 KV heads of 128, 32
layers), batch 8, long contexts, against the 16-bit cache, with the correctness checks in the same run.

1. Checks: the Triton kernel that reads the packed cache (kernels/kv_triton.py) against the dequantized
   past through softmax attention in float32, at the 8B head shape, 2/3/4/8 bits, keys per channel and
   token-wise: max relative error.
2. The kernel's launch configurations at the longest context (the fastest is used by every row after).
   Decode attention of one layer (the part KV quantization changes), batch 8, contexts 4k-32k: fp16 K/V
   through torch's scaled_dot_product_attention (GQA, q length 1), the packed cache through the kernel
   (plus the exact current token), and the packed cache dequantized then sdpa (the cache's path without
   the kernel). Median of CUDA-event timings after warm-up; bytes of K/V read and the rate.
3. Whole model: random 8B-shaped fp16 weights, the cache filled to CONTEXT tokens with random K/V (the
   timing does not depend on the values), eager decode steps of batch 8 (transformers' forward, no CUDA
   graph on either side): fp16 K/V in transformers' StaticCache (sdpa) against rdquant's
   QuantizedKVCache with the kernel; tokens/s and KV memory.

    PYTHONPATH=src python bench/kv_decode.py [--json OUT.json] [--context 32768] [--batch 8]
    python bench/kv_decode.py --tiny   # CPU dry run under Triton's interpreter (tiny shapes)
    python bench/kv_decode.py --tables OUT.json   # (no GPU) the results page's table from that run
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0)
RESULTS = Path(__file__).resolve().parent / "results"
INTRO = ("Llama-3-8B shape (32 query / 8 KV heads of 128, 32 layers), batch 8. The 'attention' rows are one "
         "layer's decode attention (q length 1) over the past: fp16 K/V through torch's scaled_dot_product_attention "
         "against the packed cache read by rdquant's Triton kernel (keys per channel over 32 tokens, values per "
         "token, whole-head groups), and the packed cache dequantized then sdpa. The 'model' rows are whole eager "
         "decode steps of random 8B-shaped fp16 weights with the cache filled to the context (no CUDA graph on "
         "either side): fp16 K/V in transformers' StaticCache against rdquant's QuantizedKVCache. Kernel checks "
         "(relative error against float32 attention over the dequantized past) are in the raw JSON.")


def write_tables(result: dict, source: str) -> None:
    """bench/results/kv_decode.json (the results page's table) from one run's JSON."""
    common = {"command": result["command"], "source": f"bench/results/raw/{source}", "date": result["date"],
              "machine": result["device"]}
    rows = []
    for r in result.get("attention", []):
        for what, key in (("fp16 sdpa", "fp16"), ("KV4 Triton kernel", "kv4"), ("KV2 Triton kernel", "kv2"),
                          ("KV4 dequantize + sdpa", "kv4_dequant_sdpa"), ("KV2 dequantize + sdpa", "kv2_dequant_sdpa")):
            ms = r.get(f"{key}_ms")
            if ms is not None:
                rows.append({"part": "attention, one layer", "what": what, "context": r["context"], "batch": r["batch"],
                             "ms": ms, "x_fp16": r["fp16_ms"] / ms, "gb_s": r.get(f"{key}_gb_s"), **common})
    for r in result.get("model", []):
        rows.append({"part": "whole model decode step", "what": r["what"], "context": r["context"], "batch": r["batch"],
                     "ms": r["step_ms"], "x_fp16": r["x_fp16"], "tok_s": r["tok_s"], "kv_gib": r.get("kv_gib"),
                     "peak_gib": r.get("peak_gib"), "logits_rel_error": r.get("logits_rel_error"), **common})
    cols = [["part", "part"], ["what", "what"], ["context", "context"], ["batch", "batch"], ["ms", "ms", ".3f"],
            ["x_fp16", "speed x fp16", ".2f"], ["gb_s", "GB/s read", ".0f"], ["tok_s", "tokens/s", ".1f"],
            ["kv_gib", "KV GiB", ".2f"], ["peak_gib", "peak GiB", ".1f"], ["logits_rel_error", "logits err vs dequant", ".1e"]]
    (RESULTS / "kv_decode.json").write_text(json.dumps(
        {"title": "GPU decode with the quantized KV cache", "question": "How fast does decode attend over a 4-bit or "
         "2-bit cache at long context, against a 16-bit cache?", "intro": INTRO, "columns": cols, "rows": rows},
        indent=1) + "\n")


TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev: torch.device, reps: int) -> float:
    """Median seconds of fn() over reps after two warm-up calls (CUDA events on a GPU)."""
    fn(), fn()
    out = []
    for _ in range(reps):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(out)


def packed_past(B: int, H: int, n: int, D: int, spec, dev: torch.device, dtype: torch.dtype):
    """A QuantizedKVLayer-style packed past of n random tokens (written in chunks) and the exact K/V."""
    from rdquant.kvcache import KVParams, QuantizedKVLayer

    class _Attn(torch.nn.Module):
        pass

    attn = _Attn()
    attn.register_buffer("kv_shift_k", torch.zeros(H, D, device=dev))
    layer = QuantizedKVLayer(KVParams(spec, attn))
    g = torch.Generator(device=dev).manual_seed(n)
    chunk = 4096
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        k = torch.randn(B, H, m, D, device=dev, dtype=dtype, generator=g)
        v = torch.randn(B, H, m, D, device=dev, dtype=dtype, generator=g)
        if not layer.is_initialized:
            layer.lazy_initialization(k, v)
        layer._store(k, v)
    return layer


def checks(dev: torch.device, tiny: bool) -> list[dict]:
    from rdquant.kvcache import KVSpec

    rows = []
    B, Hq, H, D, n = (2, 4, 2, 16, 224) if tiny else (2, 32, 8, 128, 3008)  # whole key groups of 32
    for bits in (2, 3, 4, 8):
        for axis in ("channel", "token"):
            spec = KVSpec(bits=bits, key_axis=axis, group_size=-1 if axis == "channel" else D // 4)
            layer = packed_past(B, H, n, D, spec, dev, torch.float16)
            q = torch.randn(B, Hq, D, device=dev, dtype=torch.float16)
            ke = torch.randn(B, H, 1, D, device=dev, dtype=torch.float16)
            ve = torch.randn(B, H, 1, D, device=dev, dtype=torch.float16)
            sc = D ** -0.5
            got = layer.fused_attention(q, ke, ve, n, sc).float()
            pk, pv = layer.dequantized_past(n, ke)
            kk = torch.cat([pk, ke], 2).repeat_interleave(Hq // H, 1).float()
            vv = torch.cat([pv, ve], 2).repeat_interleave(Hq // H, 1).float()
            ref = (torch.softmax(q.float()[:, :, None] @ kk.transpose(-1, -2) * sc, -1) @ vv)[:, :, 0]
            err = float((got - ref).abs().max() / ref.abs().max())
            rows.append({"bits": bits, "keys": axis, "rel_error": err, "ok": err <= 1e-2})
            print(f"check KV{bits} keys {axis}: rel error {err:.2e}", flush=True)
            del layer
    return rows


def _packed_timings(q: torch.Tensor, B: int, H: int, L: int, D: int, bits: int, dev: torch.device, reps: int
                    ) -> tuple[float, float, int]:
    """Seconds of one decode attention over L packed past tokens through the kernel and through dequantize +
    sdpa, and the packed bytes."""
    import torch.nn.functional as F

    from rdquant.kvcache import KVSpec

    layer = packed_past(B, H, L, D, KVSpec(bits=bits), dev, torch.float16)
    ke = torch.randn(B, H, 1, D, device=dev, dtype=torch.float16)
    ve = torch.randn_like(ke)
    t = timed(lambda: layer.fused_attention(q[:, :, 0], ke, ve, L, D ** -0.5), dev, reps)

    def unfused():
        pk, pv = layer.dequantized_past(L, ke)
        return F.scaled_dot_product_attention(q, torch.cat([pk, ke], 2), torch.cat([pv, ve], 2), enable_gqa=True)

    return t, timed(unfused, dev, max(3, reps // 10)), layer.k.nbytes() + layer.v.nbytes()


def sweep(dev: torch.device, B: int, L: int, tiny: bool, reps: int) -> list[dict]:
    """The kernel's launch configurations at context L, KV4 (CONFIG is set to the fastest, which every later
    row uses): block_n x num_warps x programs per SM x pipeline stages."""
    import itertools

    from rdquant.kernels import kv_triton
    from rdquant.kvcache import KVSpec

    Hq, H, D = (4, 2, 16) if tiny else (32, 8, 128)
    layer = packed_past(B, H, L, D, KVSpec(bits=4), dev, torch.float16)
    q = torch.randn(B, Hq, D, device=dev, dtype=torch.float16)
    ke = torch.randn(B, H, 1, D, device=dev, dtype=torch.float16)
    ve = torch.randn_like(ke)
    ref = layer.fused_attention(q, ke, ve, L, D ** -0.5).float()
    default, rows = dict(kv_triton.CONFIG), []
    grid = itertools.product((32, 64), (4,), (8,), (2,)) if tiny else \
        itertools.product((32, 64, 128), (4, 8), (4, 16), (2,))
    for bn, nw, ps, st in grid:
        kv_triton.CONFIG.update(block_n=bn, num_warps=nw, per_sm=ps, num_stages=st)
        try:
            out = layer.fused_attention(q, ke, ve, L, D ** -0.5).float()
            err = float((out - ref).abs().max() / ref.abs().max())
            t = timed(lambda: layer.fused_attention(q, ke, ve, L, D ** -0.5), dev, reps)
            rows.append({**kv_triton.CONFIG, "ms": t * 1e3, "rel_error": err})
        except Exception as e:  # noqa: BLE001 - a configuration that does not compile or fit: say so, go on
            rows.append({**kv_triton.CONFIG, "ms": None, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"})
        print("sweep", rows[-1], flush=True)
    ok = [r for r in rows if r["ms"] is not None and r["rel_error"] <= 1e-2]
    best = min(ok, key=lambda r: r["ms"]) if ok else default
    kv_triton.CONFIG.clear()
    kv_triton.CONFIG.update({k: best[k] for k in default})
    print("kernel configuration:", kv_triton.CONFIG, flush=True)
    return rows


def attention_rows(dev: torch.device, B: int, contexts: list[int], tiny: bool, reps: int) -> list[dict]:
    import torch.nn.functional as F

    Hq, H, D = (4, 2, 16) if tiny else (32, 8, 128)
    rows = []
    for L in contexts:
        g = torch.Generator(device=dev).manual_seed(L)
        q = torch.randn(B, Hq, 1, D, device=dev, dtype=torch.float16, generator=g)
        kv = [torch.randn(B, H, L + 1, D, device=dev, dtype=torch.float16, generator=g) for _ in range(2)]
        fp16 = timed(lambda: F.scaled_dot_product_attention(q, *kv, enable_gqa=True), dev, reps)
        fp16_bytes = 2 * kv[0].numel() * 2
        kv.clear()
        row = {"context": L, "batch": B, "fp16_ms": fp16 * 1e3, "fp16_gb_s": fp16_bytes / fp16 / 1e9}
        for bits in (4, 2):
            t, tu, nb = _packed_timings(q, B, H, L, D, bits, dev, reps)
            row.update({f"kv{bits}_ms": t * 1e3, f"kv{bits}_gb_s": nb / t / 1e9, f"kv{bits}_x_fp16": fp16 / t,
                        f"kv{bits}_dequant_sdpa_ms": tu * 1e3, f"kv{bits}_bytes_x_fp16": nb / fp16_bytes})
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        print("attention " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
              flush=True)
        rows.append(row)
    return rows


@torch.inference_mode()
def model_rows(dev: torch.device, B: int, L: int, tiny: bool, steps: int) -> list[dict]:
    from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

    from rdquant import kvcache
    from rdquant.kvcache import KVSpec, QuantizedKVCache

    cfg = LlamaConfig(**(TINY if tiny else LLAMA_8B), max_position_embeddings=L + steps + 64)
    torch.manual_seed(0)
    with torch.device(dev):
        model = LlamaForCausalLM(cfg).to(torch.float16).eval()
    H, D = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    g = torch.Generator(device=dev).manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (B, 1), device=dev, generator=g)
    rows: list[dict] = []
    first: dict[str, torch.Tensor] = {}

    def run(cache, label: str, n_steps: int) -> None:
        fw = {kvcache.cache_kwarg(model): cache, "use_cache": True}
        first[label] = model(ids, **fw).logits.float()  # warm-up (and the kernels' compilation)
        sync(dev)
        times = []
        for _ in range(n_steps):
            t0 = time.perf_counter()
            model(ids, **fw)
            sync(dev)
            times.append(time.perf_counter() - t0)
        step = statistics.median(times)
        row = {"what": label, "context": L, "batch": B, "step_ms": step * 1e3, "tok_s": B / step}
        if dev.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        rows.append(row)
        print("model " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
              flush=True)

    # fp16: StaticCache, initialised by one token, then its length set to L (the zeros it holds time the same)
    static = StaticCache(config=cfg, max_cache_len=L + steps + 8)
    model(ids, **{kvcache.cache_kwarg(model): static, "use_cache": True})
    for lay in static.layers:
        lay.cumulative_length.fill_(L)
    kv_bytes = sum(lay.keys.numel() * 2 + lay.values.numel() * 2 for lay in static.layers) * L / (L + steps + 8)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run(static, "fp16 KV (StaticCache, sdpa)", steps)
    rows[-1]["kv_gib"] = kv_bytes / 2**30
    del static
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    for bits in (4, 2):
        kvcache.attach(model, KVSpec(bits=bits))
        for fused in (True, False):
            cache = QuantizedKVCache(model, fused=fused)
            for lay in cache.layers:  # the packed past, as a prefill of L tokens would leave it
                fill = packed_past(B, H, L, D, lay.params.spec, dev, torch.float16)
                lay.lazy_initialization(*(torch.empty(B, H, 0, D, device=dev, dtype=torch.float16),) * 2)
                lay.k, lay.v = fill.k, fill.v
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            label = f"KV{bits} rdquant, {'Triton kernel' if fused else 'dequantize + sdpa'}"
            run(cache, label, steps if fused else 3)
            rows[-1]["kv_gib"] = cache.nbytes() / 2**30
            if not fused:  # the same packed past and token: the kernel's logits against the dequantizing path's
                a, b = first[label.replace("dequantize + sdpa", "Triton kernel")], first[label]
                rows[-2]["logits_rel_error"] = float((a - b).abs().max() / b.abs().max())
                rows[-2]["top1_same"] = float((a.argmax(-1) == b.argmax(-1)).float().mean())
            del cache
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        for m in kvcache.attention_modules(model):
            m.kv_quant = None
        for c in kvcache._configs(model):
            c._attn_implementation = "sdpa"
    base = rows[0]["tok_s"]
    for r in rows:
        r["x_fp16"] = r["tok_s"] / base
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    ap.add_argument("--parts", nargs="+", default=["checks", "attention", "model"], choices=["checks", "attention", "model"])
    ap.add_argument("--tiny", action="store_true", help="CPU dry run under Triton's interpreter, tiny shapes")
    ap.add_argument("--tables", type=Path, help="no run: write the results page's table from this run's JSON")
    args = ap.parse_args()
    if args.tables:
        if not args.tables.is_file():
            raise SystemExit(f"--tables {args.tables}: no such file (give the JSON a GPU run wrote with --json)")
        run = json.loads(args.tables.read_text())
        raw = RESULTS / "raw" / f"kv_decode-{run['date']}.json"
        raw.parent.mkdir(parents=True, exist_ok=True)
        raw.write_text(json.dumps(run, indent=1))
        write_tables(run, raw.name)
        print(f"tables written from {raw}")
        return
    if args.tiny:
        os.environ["TRITON_INTERPRET"] = "1"
        dev = torch.device("cpu")
        args.contexts, args.context, args.batch, args.steps = [96, 160], 160, 2, 2
    elif not torch.cuda.is_available():
        raise SystemExit("bench/kv_decode.py needs a CUDA GPU (or --tiny for a CPU dry run)")
    else:
        dev = torch.device("cuda")
    import triton

    out = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (interpreter)",
           "torch": torch.__version__, "triton": triton.__version__, "date": date.today().isoformat(),
           "command": "python bench/kv_decode.py " + " ".join(sys.argv[1:])}
    print(out["device"], "| torch", out["torch"], "| triton", out["triton"], flush=True)

    def save() -> None:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(out, indent=1))

    if "checks" in args.parts:
        out["checks"] = checks(dev, args.tiny)
        save()
    if "attention" in args.parts or "model" in args.parts:
        from rdquant.kernels import kv_triton

        out["sweep"] = sweep(dev, args.batch, args.context, args.tiny, 2 if args.tiny else 10)
        out["config"] = dict(kv_triton.CONFIG)
        save()
    if "attention" in args.parts:
        out["attention"] = attention_rows(dev, args.batch, args.contexts, args.tiny, 2 if args.tiny else 50)
        save()
    if "model" in args.parts:
        out["model"] = model_rows(dev, args.batch, args.context, args.tiny, args.steps)
        save()
    bad = [r for r in out.get("checks", []) if not r["ok"]]
    if bad:
        raise SystemExit(f"{len(bad)} kernel checks are not within 1e-2 of the reference")


if __name__ == "__main__":
    main()
