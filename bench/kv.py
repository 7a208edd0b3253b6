"""KV-cache quantization (issue 23, WKVQuant) on the default model: perplexity with the past-only
evaluation (every token sees the quantized K/V of earlier tokens and its own exact), against a 16-bit
cache, KIVI-style quantization and transformers' QuantizedCache.

    python bench/kv.py                          # the default rows (peers need .venv-bench, see below)
    .venv-bench/bin/python bench/kv.py          # the same, with QuantizedCache's quanto and hqq backends
    python bench/kv.py --rows "KV4|scheme=rdquant bits=4" --windows 8
    python bench/kv.py ... --results            # and publish: bench/results/kv.json

A row is `label|KEY=VALUE ...`: scheme = fp16 | rdquant | kivi | quanto | hqq, bits, group (-1: whole
head), residual (16-bit recent tokens), smooth (key smoothing exponent, -1 off), shift (1/0: static
channel shifts), crr (cross-block reconstruction through this many next blocks; crr_steps, crr_lr),
past_only (1/0: 0 quantizes a token's own K/V too: the ablation), weights = fp | gptq4
(GPTQ w4 g64 weights; with scheme=rdquant compressed with --kv-bits, the KV calibration inside the
pipeline), stepwise=1 (token by token through the cache instead of one pass).
rdquant and kivi rows run in one pass (kvcache.past_only; a test checks it equals the token-by-token
cache); quanto / hqq rows run token by token through transformers' QuantizedCache (their own
arithmetic: per-channel groups of 64 re-quantized as the 16-bit residual of 128 tokens fills) on
--peer-windows windows, and every rdquant row of the same table is measured on those windows too.
KIVI-style is our implementation of its scheme (KIVI's code is CUDA-only): keys per channel in groups of
32 tokens, values per token, the current partial group in 16 bits. Calibration of rdquant's shifts and
scales: 32 x 512 tokens of the first 800 C4 documents (bench/slim.py's split); evaluation: WikiText-2
test, first --windows x 2048 windows.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import rdquant  # noqa: E402
from quality import CACHE, ROOT, cached_row, provenance, publish_rows  # noqa: E402
from rdquant import kvcache  # noqa: E402
from rdquant.data import eval_text, eval_windows, shared_data_dir  # noqa: E402
from rdquant.kvcache import KVSpec  # noqa: E402
from rdquant.models import load_model  # noqa: E402
from slim import held_out_files  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "kv.json"
GEN_RESULTS = ROOT / "bench" / "results" / "kv_generate.json"
DEFAULT_ROWS = [
    "W16, 16-bit KV|scheme=fp16",
    "W16 KV4 rdquant (keys per channel g32, values per token; past-only)|scheme=rdquant bits=4",
    "W16 KV4 KIVI-style (keys per channel g32, values per token)|scheme=kivi bits=4",
    "W16 KV4 rdquant + 2D (smoothing 0.5, shifts)|scheme=rdquant bits=4 smooth=0.5 shift=1",
    "W16 KV4 rdquant, no past-only (own K/V quantized too)|scheme=rdquant bits=4 past_only=0",
    "W16 KV4 WKVQuant token-wise keys + 2D|scheme=rdquant bits=4 axis=token smooth=0.5 shift=1",
    "W16 KV4 token-wise keys, no 2D|scheme=rdquant bits=4 axis=token",
    "W16 KV2 rdquant (clip search)|scheme=rdquant bits=2",
    "W16 KV2 rdquant, min-max|scheme=rdquant bits=2 clip=0",
    "W16 KV2 KIVI-style|scheme=kivi bits=2",
    "W16 KV2 WKVQuant token-wise keys + 2D|scheme=rdquant bits=2 axis=token smooth=0.5 shift=1",
    "W4 (GPTQ g64), 16-bit KV|scheme=fp16 weights=gptq4",
    "W4 (GPTQ g64) KV4 rdquant|scheme=rdquant bits=4 weights=gptq4",
]
PEER_ROWS = [
    "W16, 16-bit KV|scheme=fp16",
    "W16 KV4 rdquant, residual 128|scheme=rdquant bits=4 residual=128",
    "W16 KV4 rdquant|scheme=rdquant bits=4",
    "W16 KV4 QuantizedCache quanto (residual 128)|scheme=quanto bits=4",
    "W16 KV4 QuantizedCache hqq (residual 128)|scheme=hqq bits=4",
    "W16 KV2 rdquant, residual 128|scheme=rdquant bits=2 residual=128",
    "W16 KV2 rdquant|scheme=rdquant bits=2",
    "W16 KV2 QuantizedCache quanto (residual 128)|scheme=quanto bits=2",
    "W16 KV2 QuantizedCache hqq (residual 128)|scheme=hqq bits=2",
    "W16 KV4 rdquant, token by token|scheme=rdquant bits=4 stepwise=1",
]
INTS = ("bits", "group", "residual", "shift", "past_only", "stepwise", "tokens", "clip", "crr", "crr_steps")


def parse(text: str) -> tuple[str, dict]:
    label, _, spec = text.partition("|")
    opts = dict(p.split("=", 1) for p in spec.split())
    out = {"scheme": "fp16", "bits": 16, "group": -1, "residual": 0, "smooth": -1, "shift": 0, "past_only": 1,
           "weights": "fp", "stepwise": 0, "axis": "channel", "tokens": 32,
           "clip": -1, "crr": 0, "crr_steps": 16, "crr_lr": 5e-3}
    for k, v in opts.items():
        if k not in out:
            raise SystemExit(f"unknown row key {k!r} in {text!r}")
        out[k] = int(v) if k in INTS else float(v) if k in ("smooth", "crr_lr") else v
    if out["clip"] == -1:  # as the CLI's auto
        out["clip"] = int(out["bits"] <= 2)
    return label.strip(), out


# --- schemes ---------------------------------------------------------------------------------------

def _minmax_fake(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Asymmetric min-max fake quantization with one (scale, minimum) per slice along `dim`."""
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    s = ((hi - lo) / ((1 << bits) - 1)).clamp_min(1e-8)
    return ((x - lo) / s).round().clamp(0, (1 << bits) - 1) * s + lo


def kivi_quantizer(bits: int, group: int = 32):
    """KIVI's scheme, one pass: keys per channel over groups of `group` tokens, values per token; a query
    sees keys/values of complete groups before its own quantized and the rest (its partial group) exact."""
    def q(k: torch.Tensor, v: torch.Tensor, T: int):
        B, H, S, D = k.shape
        n = S // group * group
        kq = k.clone()
        if n:
            kq[:, :, :n] = _minmax_fake(k[:, :, :n].reshape(B, H, n // group, group, D), bits, 3).reshape(B, H, n, D)
        vq = _minmax_fake(v, bits, -1)
        i = torch.arange(S - T, S, device=k.device)[:, None]
        j = torch.arange(S, device=k.device)[None, :]
        full = j >= (i // group) * group  # the query's own partial group (and later, masked anyway)
        return kq, vq, full
    return q


def rdquant_no_past_only(params: list[kvcache.KVParams]):
    """Ablation: a token's own K/V quantized too (the same token-wise groups after the same shifts)."""
    def make(p: kvcache.KVParams):
        def q(k: torch.Tensor, v: torch.Tensor, T: int):
            ks, _ = p.shifted(k, v)
            shift = k - ks
            full = torch.zeros(T, k.shape[2], dtype=torch.bool, device=k.device)
            return p.fake_keys(ks) + shift, p.fake_values(v), full
        return q
    return make


def kv_bytes_per_token(r: dict, kv_heads: int, D: int, layers: int) -> float:
    """Cache bytes per token (all layers, K and V) at long context: codes plus scales and minimums."""
    b = r["bits"]
    if r["scheme"] == "fp16":
        return 2 * layers * kv_heads * D * 2
    if r["scheme"] == "rdquant":
        return layers * KVSpec(b, r["group"], 0, r["axis"], r["tokens"]).bytes_per_token(D, kv_heads)
    if r["scheme"] == "kivi":  # K: per channel per 32 tokens; V: per token
        return layers * kv_heads * (2 * D * b / 8 + 4 * D / 32 + 4)
    return layers * kv_heads * 2 * D * (b / 8 + 4 / 64)  # quanto / hqq: a scale and zero per 64 values


# --- evaluation ------------------------------------------------------------------------------------

def stepwise_ppl(model, windows: torch.Tensor, make_cache) -> float:
    """Teacher-forced perplexity token by token through a cache (what generation computes)."""
    kw = kvcache.cache_kwarg(model)
    total, count = 0.0, 0
    with torch.inference_mode():
        for w in windows:
            cache = make_cache()
            for t in range(w.numel() - 1):
                logits = model(w[None, t : t + 1], **{kw: cache}, use_cache=True).logits[0, -1].float()
                total += float(F.cross_entropy(logits[None], w[None, t + 1]))
                count += 1
    return math.exp(total / count)


def prepare(r: dict, args, tok, calib: torch.Tensor):
    """(model, make_cache or None) for a row: weights, KV parameters and folds applied."""
    if r["weights"] == "gptq4":
        cfg = rdquant.CompressConfig(bits=4, group_size=64, embed_bits=16,
                                     **({} if r["scheme"] != "rdquant" else dict(
                                         kv_bits=r["bits"], kv_group=r["group"], kv_residual=r["residual"],
                                         kv_smooth=r["smooth"], kv_shift=bool(r["shift"]), kv_key_axis=r["axis"],
                                         kv_key_tokens=r["tokens"], kv_clip="on" if r["clip"] else "off",
                                         kv_crr=r["crr"], kv_crr_steps=r["crr_steps"], kv_crr_lr=r["crr_lr"])))
        base, _, mid = load_model(args.model)
        cm = rdquant.compress(base, cfg, tokenizer=tok, calib_ids=calib, model_id=mid, progress=False)
        name = "kv_w4" + (f"_kv{r['bits']}" if r["scheme"] == "rdquant" else "")
        model = rdquant.load(cm.save(CACHE / "artifacts" / name, overwrite=True))
    else:
        model = copy.deepcopy(args.float_model)
    if r["scheme"] == "rdquant" and r["weights"] == "fp":
        spec = KVSpec(r["bits"], r["group"], r["residual"], r["axis"], r["tokens"], bool(r["clip"]))
        kvcache.calibrate(model, calib[:32], spec, None if r["smooth"] == -1 else r["smooth"], bool(r["shift"]),
                          crr=r["crr"], crr_steps=r["crr_steps"], crr_lr=r["crr_lr"])
    if r["scheme"] == "rdquant" and not r["past_only"]:
        params = kvcache.kv_params(model)
        make = rdquant_no_past_only(params)
        for p in params:
            p.attn.kv_fake = make(p)
            del p.attn.kv_quant
    if r["scheme"] == "kivi":
        for m in kvcache.attention_modules(model):
            m.kv_fake = kivi_quantizer(r["bits"])
    make_cache = None
    if r["scheme"] in ("quanto", "hqq"):
        from transformers import QuantizedCache

        make_cache = lambda: QuantizedCache(r["scheme"], model.config, nbits=r["bits"])
    elif r["stepwise"]:
        make_cache = lambda: kvcache.QuantizedKVCache(model)
    return model, make_cache


def run(label: str, r: dict, args, tok, calib: torch.Tensor) -> dict:
    row = {"config": label, "spec": args.spec_of(label), **{k: r[k] for k in ("scheme", "bits", "weights")},
           **provenance("kv.py")}
    t0 = time.perf_counter()
    model, make_cache = prepare(r, args, tok, calib)
    kv, D = kvcache.head_shape(kvcache.attention_modules(model)[0])
    layers = len(kvcache.attention_modules(model))
    row["kv_bytes_per_token"] = round(kv_bytes_per_token(r, kv, D, layers), 1)
    row["kv_x_fp16"] = round(row["kv_bytes_per_token"] / kv_bytes_per_token({"scheme": "fp16", "bits": 16}, kv, D, layers), 3)
    n = args.windows
    if make_cache is not None:
        windows = eval_windows(tok, eval_text("wikitext2"), 2048)[:n]
        row["ppl"] = stepwise_ppl(model, windows, make_cache)
        row["evaluation"] = "token by token"
    else:
        row["ppl"] = rdquant.evaluate(model, tok, seqlen=2048, max_windows=n, progress=False).ppl
        row["evaluation"] = "one pass"
    row.update(windows=n, seconds=round(time.perf_counter() - t0, 1))
    return row


def generate_one(args, which: str) -> dict:
    """One process: greedy generation of --generate tokens after a 64-token WikiText-2 prompt, with a 16-bit
    (DynamicCache) or rdquant's KV4 cache; tokens/s, the cache's bytes at the end and the process's peak RSS."""
    import resource

    model, tok, _ = load_model(args.model)
    model.float().eval()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    prompt = eval_windows(tok, eval_text("wikitext2"), 64)[:1]
    kw = {}
    if which != "fp16":
        kvcache.attach(model, KVSpec(int(which.removeprefix("kv"))))
        kw = {kvcache.cache_kwarg(model): kvcache.QuantizedKVCache(model)}
    else:
        from transformers import DynamicCache

        kw = {kvcache.cache_kwarg(model): DynamicCache(config=model.config)}
    cache = next(iter(kw.values()))
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(prompt, **kw, max_new_tokens=args.generate, min_new_tokens=args.generate, do_sample=False)
    seconds = time.perf_counter() - t0
    new = out.shape[1] - prompt.shape[1]
    if which == "fp16":
        held = sum(t.numel() * t.element_size() for lay in cache.layers for t in (lay.keys, lay.values))
    else:
        held = cache.nbytes()
    return {"cache": which, "new_tokens": new, "tokens_per_s": round(new / seconds, 2), "seconds": round(seconds, 1),
            "cache_bytes": held, "context": out.shape[1],
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}


def generate_rows(args) -> list[dict]:
    """Both caches, each in its own process (so each peak RSS is its own)."""
    import json
    import subprocess

    rows = []
    for which in ("fp16", "kv4"):
        out = subprocess.run([sys.executable, __file__, "--model", args.model, "--generate", str(args.generate),
                              "--gen-one", which], capture_output=True, text=True, check=True).stdout
        rows.append({**json.loads(out.strip().splitlines()[-1]), **provenance("kv.py")})
        print(rows[-1], flush=True)
    return rows


def table(rows: list[dict], title: str) -> str:
    lines = [title, "", "| configuration | KV bytes/token | x fp16 | windows | evaluation | WikiText-2 ppl |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['kv_bytes_per_token']:.0f} | {r['kv_x_fp16']:.3f} | {r['windows']} | "
                     f"{r['evaluation']} | {r['ppl']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", nargs="+", default=None, metavar="LABEL|SPEC")
    ap.add_argument("--windows", type=int, default=32, help="WikiText-2 windows of 2048 (one-pass rows)")
    ap.add_argument("--peers", action="store_true", help="the QuantizedCache table (token by token, --peer-windows)")
    ap.add_argument("--peer-windows", type=int, default=2)
    ap.add_argument("--generate", type=int, default=0, metavar="N",
                    help="instead: generate N tokens with a 16-bit and a 4-bit cache on this CPU (tokens/s, memory)")
    ap.add_argument("--gen-one", help=argparse.SUPPRESS)
    ap.add_argument("--fresh", action="store_true", help="recompute cached rows")
    ap.add_argument("--results", action="store_true", help="publish the measured rows (bench/results/kv.json)")
    args = ap.parse_args()
    if shared_data_dir() is None:
        raise SystemExit("needs ../shared/data (WikiText-2 and the C4 file)")
    if args.gen_one:
        import json

        print(json.dumps(generate_one(args, args.gen_one)))
        return
    if args.generate:
        rows = generate_rows(args)
        if args.results:
            publish_rows(GEN_RESULTS, rows, lambda r: (r["cache"], r["new_tokens"]), "kv.py", stamped=True)
        return
    rows_text = args.rows or (PEER_ROWS if args.peers else DEFAULT_ROWS)
    if args.peers:
        args.windows = args.peer_windows
    args.float_model, tok, _ = load_model(args.model)
    args.float_model.float().eval()
    calib_path, _ = held_out_files(tok)
    calib = load_file(calib_path)["input_ids"]
    specs = {}
    args.spec_of = lambda label: specs[label]
    rows = []
    for text in rows_text:
        label, r = parse(text)
        specs[label] = text.partition("|")[2].strip()
        name = "kv_" + ("_".join(p.replace("=", "") for p in sorted(specs[label].split())) or "fp16") + f"_w{args.windows}"
        try:
            row = cached_row(name, args.fresh, lambda: run(label, r, args, tok, calib))
        except ImportError as e:
            print(f"{label}: skipped ({e}); run with .venv-bench/bin/python for the QuantizedCache peers")
            continue
        row["config"] = label
        rows.append(row)
        print(table(rows, f"{args.model}: WikiText-2 test, first {args.windows} x 2048 windows, past-only"), flush=True)
    if args.results:
        publish_rows(RESULTS, rows, lambda r: (r.get("spec"), r.get("windows")), "kv.py", stamped=True)


if __name__ == "__main__":
    main()
