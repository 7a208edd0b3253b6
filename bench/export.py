"""Export the default model's artifacts and check each export where it loads: compressed-tensors (loaded
back with transformers when symmetric; every layer decompressed with compressed-tensors' own
decompressor otherwise), GPTQ (read back as its documented bit layout) and GGUF (dequantized by the gguf
package; loaded by transformers, and by llama.cpp with --llama-python). Perplexity on the first
WikiText-2 windows of the transformers-loaded export beside rdquant's own load of the artifact. Prints a
table and writes bench/results/export.json.

    python bench/export.py --artifact artifacts/smollm2-135m-gptq-w4g64 --artifact artifacts/w3g64-sym \
        [--windows 8] [--seqlen 2048]
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

import rdquant
from rdquant.runtime import QuantLinear

RESULTS = Path(__file__).parent / "results" / "export.json"


def dir_bytes(p: Path) -> int:
    """Bytes of a file, or of every file under a directory."""
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def ct_weight_error(out: Path, ref) -> float:
    """Largest |W_exported - W_artifact| over all layers, W_exported from compressed-tensors' decompressor."""
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    import re

    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    schemes = [QuantizationScheme.model_validate(g) for g in qc["config_groups"].values()]

    def scheme_of(name: str):  # the config group whose target names the layer (one group: every Linear)
        for sc in schemes:
            if any(tg == "Linear" or (tg.startswith("re:") and re.fullmatch(tg[3:], name)) for tg in sc.targets):
                return sc
        raise KeyError(f"no config group targets {name}")

    t = load_file(out / "model.safetensors")
    worst = 0.0
    for name, m in ((n, m) for n, m in ref.named_modules() if isinstance(m, QuantLinear)):
        sd = {k.rpartition(".")[2]: v for k, v in t.items() if k.rpartition(".")[0] == name}
        W = PackedQuantizationCompressor.decompress(sd, scheme_of(name))["weight"].float()
        worst = max(worst, float((W - m.quantized_weight().dequantize()).abs().max()))
    return worst


def gptq_weight_error(out: Path, ref) -> float:
    """Largest |W_exported - W_artifact| with the GPTQ files unpacked as the format documents (dense
    LSB-first bit stream of 32 codes per `bits` int32 words; v1 zero points stored less one)."""
    from safetensors.torch import load_file

    qc = json.loads((out / "quantize_config.json").read_text())
    bits, v1 = qc["bits"], qc["checkpoint_format"] == "gptq"
    t = load_file(out / "model.safetensors")

    def stream(words: torch.Tensor, n: int) -> torch.Tensor:
        w = words.to(torch.int64) & 0xFFFFFFFF
        idx = torch.arange(n)[:, None] * bits + torch.arange(bits)[None, :]  # [n, bits] bit positions
        b = (w[idx // 32] >> (idx % 32)[..., None]) & 1  # [n, bits, cols]
        return (b << torch.arange(bits)[None, :, None]).sum(1)

    worst = 0.0
    for name, m in ((n, m) for n, m in ref.named_modules() if isinstance(m, QuantLinear)):
        codes = stream(t[f"{name}.qweight"], m.in_features)
        zeros = stream(t[f"{name}.qzeros"].t(), m.out_features).t() + (1 if v1 else 0)
        g = t[f"{name}.g_idx"].long()
        W = ((codes - zeros[g]).float() * t[f"{name}.scales"].float()[g]).t()
        worst = max(worst, float((W - m.quantized_weight().dequantize()).abs().max()))
    return worst


def gguf_linears(path: Path, config) -> dict[str, torch.Tensor]:
    """Every decoder linear of a llama GGUF file, dequantized by the gguf package from its blocks, under its
    transformers name (query/key rows put back from llama.cpp's rotary order)."""
    import gguf

    from rdquant.export_gguf import LAYER_NAMES, _permute

    heads = {"self_attn.q_proj": config.num_attention_heads, "self_attn.k_proj": config.num_key_value_heads}
    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        blk, i, kind, _ = (t.name.split(".") + ["", "", ""])[:4]
        rest = next((k for k, v in LAYER_NAMES.items() if v == kind and "norm" not in v), None)
        if blk != "blk" or rest is None:
            continue
        rows, cols = int(t.shape[1]), int(t.shape[0])  # ggml lists dimensions innermost first
        W = torch.from_numpy(gguf.dequantize(t.data, t.tensor_type).reshape(rows, cols).copy()).float()
        if rest in heads:  # invert the permutation: applying it to the identity's rows gives the order
            W = W[torch.argsort(_permute(torch.arange(rows), heads[rest]))]
        out[f"model.layers.{i}.{rest}"] = W
    return out


def gguf_weight_error(out: Path, ref) -> float:
    """Largest |W_exported - W_artifact|, W_exported dequantized by the gguf package from the file's blocks."""
    exported = gguf_linears(out, ref.config)
    return max(float((exported[n] - m.quantized_weight().dequantize()).abs().max())
               for n, m in ref.named_modules() if isinstance(m, QuantLinear) and getattr(m, "kind", "linear") == "linear")


def llama_cpp_ppl(python: str, gguf_path: Path, tok, args, tmp: Path) -> float:
    """Perplexity in llama.cpp on the same windows rdquant.evaluate scores (bench/llama_cpp_ppl.py)."""
    import subprocess

    import numpy as np

    from rdquant.data import eval_text, eval_windows

    windows = eval_windows(tok, eval_text("wikitext2"), args.seqlen)[: args.windows].numpy().astype(np.int32)
    np.save(tmp / "windows.npy", windows)
    res = subprocess.run([python, str(Path(__file__).parent / "llama_cpp_ppl.py"), str(gguf_path), str(tmp / "windows.npy")],
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])["ppl"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", action="append", required=True)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--llama-python", default=None,
                    help="a python with llama-cpp-python: GGUF exports are also scored by llama.cpp")
    args = ap.parse_args()
    command = "python bench/export.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="rdq-export-"))
    for art in map(Path, args.artifact):
        ref = rdquant.load(art, backend="cached")
        tok = rdquant.load_tokenizer(art)
        sym = all(m.symmetric for m in ref.modules() if isinstance(m, QuantLinear))
        ev = dict(data="wikitext2", seqlen=args.seqlen, max_windows=args.windows, progress=False)
        ppl_ref = rdquant.evaluate(ref, tok, **ev).ppl
        for fmt in ("compressed-tensors", "gptq", "gguf"):
            t0 = time.perf_counter()
            try:
                out = rdquant.export(art, tmp / (f"{art.name}.gguf" if fmt == "gguf" else f"{art.name}-{fmt}"),
                                     format=fmt, progress=False)
            except rdquant.RdquantError as e:  # what the format cannot hold: the reason is the row
                rows.append({"artifact": art.name, "format": fmt, "symmetric": sym, "loads_in": f"refused: {e}"[:160],
                             "ppl_rdquant": round(ppl_ref, 4), "windows": f"{args.windows} x {args.seqlen}",
                             "machine": machine, "date": date.today().isoformat(), "command": command,
                             "source": "bench/export.py"})
                print(f"{art.name} {fmt}: refused ({e})", flush=True)
                continue
            secs = time.perf_counter() - t0
            err = {"compressed-tensors": ct_weight_error, "gptq": gptq_weight_error, "gguf": gguf_weight_error}[fmt](out, ref)
            ppl_exp, loads = None, "not tried (no GPTQ loader installs here)" if fmt == "gptq" else None
            if fmt == "gguf":
                from transformers import AutoModelForCausalLM

                ppl_exp = rdquant.evaluate(AutoModelForCausalLM.from_pretrained(str(out.parent), gguf_file=out.name),
                                           tok, **ev).ppl
                loads = "transformers"
                if args.llama_python:
                    ppl_llama = llama_cpp_ppl(args.llama_python, out, tok, args, tmp)
                    loads = (f"transformers; llama.cpp ppl {ppl_llama:.4f} "
                             f"({100 * (ppl_llama / ppl_ref - 1):+.3f}% from rdquant)")
            if fmt == "compressed-tensors":
                if sym:
                    from transformers import AutoModelForCausalLM

                    ppl_exp = rdquant.evaluate(AutoModelForCausalLM.from_pretrained(out), tok, **ev).ppl
                    loads = "transformers"
                else:
                    loads = "no: transformers cannot load asymmetric pack-quantized (upstream)"
            row = {"artifact": art.name, "format": fmt, "symmetric": sym, "export_s": round(secs, 1),
                   "export_mib": round(dir_bytes(out) / 2**20, 1), "artifact_mib": round(dir_bytes(art) / 2**20, 1),
                   "max_weight_error": err, "loads_in": loads, "ppl_rdquant": round(ppl_ref, 4),
                   "ppl_export": None if ppl_exp is None else round(ppl_exp, 4),
                   "ppl_rel_diff": None if ppl_exp is None else f"{100 * (ppl_exp / ppl_ref - 1):+.3f}%",
                   "windows": f"{args.windows} x {args.seqlen}", "machine": machine, "date": date.today().isoformat(),
                   "command": command, "source": "bench/export.py"}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.llama_python:  # llama.cpp's own distance from torch: the source GGUF against its float original
        from rdquant.export import _source_gguf
        from rdquant.artifact import read_manifest

        src = _source_gguf(read_manifest(args.artifact[0]))
        if src is not None:
            tok = rdquant.load_tokenizer(args.artifact[0])
            ev = dict(data="wikitext2", seqlen=args.seqlen, max_windows=args.windows, progress=False)
            ppl_float = rdquant.evaluate(rdquant.load_original(str(read_manifest(args.artifact[0])["source_model"])), tok, **ev).ppl
            ppl_llama = llama_cpp_ppl(args.llama_python, src, tok, args, tmp)
            rows.append({"artifact": f"source: {src.name}", "format": "gguf", "loads_in": f"llama.cpp ppl {ppl_llama:.4f}",
                         "ppl_rdquant": round(ppl_float, 4), "ppl_export": round(ppl_llama, 4),
                         "ppl_rel_diff": f"{100 * (ppl_llama / ppl_float - 1):+.3f}%", "windows": f"{args.windows} x {args.seqlen}",
                         "machine": machine, "date": date.today().isoformat(), "command": command, "source": "bench/export.py",
                         "note": "llama.cpp on the package's own GGUF against its float original in torch: llama.cpp's "
                                 "compute (8-bit activations in its quantized dot products) alone"})
            print(json.dumps(rows[-1]), flush=True)
    cols = [["artifact", "artifact"], ["format", "format"], ["symmetric", "symmetric"], ["export_s", "export s", ".1f"],
            ["artifact_mib", "artifact MiB", ".1f"], ["export_mib", "export MiB", ".1f"],
            ["max_weight_error", "max weight err", ".1e"], ["loads_in", "loaded by"], ["ppl_rdquant", "ppl rdquant", ".3f"],
            ["ppl_export", "ppl export", ".3f"], ["ppl_rel_diff", "diff"], ["windows", "WikiText-2 windows"]]
    if RESULTS.is_file():  # rows of other artifacts (earlier runs, e.g. with --llama-python) stay
        new = {(r["artifact"], r["format"]) for r in rows}
        rows = [r for r in json.loads(RESULTS.read_text())["rows"] if (r["artifact"], r["format"]) not in new] + rows
    RESULTS.write_text(json.dumps({
        "title": "Export", "question": "Do rdquant's exports load elsewhere and hold the same model?",
        "intro": ("The default model's artifacts exported by `rdquant export`. Max weight error: every layer of the export "
                  "read back (compressed-tensors: its own decompressor, output in fp16, so products of 10-bit scales round; "
                  "GPTQ: the documented bit layout; GGUF: the gguf package's dequantization) "
                  "against the artifact's dequantized weight. Perplexity: the first WikiText-2 windows, rdquant.load "
                  "(cached backend) against the export loaded by transformers (and, for GGUF, by llama.cpp through "
                  "llama-cpp-python where given; its row `source:` scores the package's own GGUF against the float "
                  "original, llama.cpp's own distance from torch: it quantizes activations to 8 bits in its dot products). "
                  "A format that cannot hold an artifact exactly refuses it; the reason is the row."),
        "columns": cols, "rows": rows}, indent=1) + "\n")
    print(f"rows written to {RESULTS}")


if __name__ == "__main__":
    main()
