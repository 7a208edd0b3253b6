"""The pipeline on an NVIDIA GPU: compress a tiny random Llama with GPTQ and CLAQ on CUDA, save,
reload on CUDA, check bit-exact reload and generate; stream the last artifact's blocks under a GPU
memory budget (`max_memory`) and compare logits and greedy tokens with the full load; then CLAQ on one
default-model-sized layer on CUDA vs CPU. Run on the device machine:

    PYTHONPATH=src python3 bench/cuda_smoke.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

import rdquant
from rdquant.data import read_documents
from rdquant.models import load_model
from rdquant.runtime import QuantLinear
from rdquant.testing import save_tiny_model_dir


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
    tmp = Path(tempfile.mkdtemp())
    src = save_tiny_model_dir(tmp / "tiny", "llama", hidden=256, intermediate=704, layers=4)
    (src / "eval.txt").write_text("\n\n".join(read_documents(None)[100:160]))
    jobs = [(f"{b}-bit g64", dict(bits=b, group_size=64)) for b in (4, 3, 2)]
    jobs += [("claq 3.1 bpw", dict(method="claq", target_bits=3.1)),
             ("claq 2-bit +0.5% outliers", dict(method="claq", bits=2, claq_outlier_frac=0.005))]
    for label, kw in jobs:
        model, tok, mid = load_model(str(src))
        cfg = rdquant.CompressConfig(calib_samples=64, calib_seqlen=256, device="cuda", **kw)
        t0 = time.perf_counter()
        cm = rdquant.compress(model, cfg, tokenizer=tok, model_id=mid, progress=False)
        t = time.perf_counter() - t0
        out = cm.save(tmp / label.replace(" ", "_"))
        loaded = rdquant.load(out, device="cuda")
        exact = all(torch.equal(m.dequantized_weight().cpu(), loaded.get_submodule(n).dequantized_weight().cpu())
                    for n, m in cm.model.named_modules() if isinstance(m, QuantLinear))
        gain = sum(l.proxy_error for l in cm.logs) / sum(l.proxy_error_rtn for l in cm.logs)
        ppl = rdquant.evaluate(str(out), data=str(src / "eval.txt"), seqlen=128, max_windows=4,
                               device="cuda", progress=False).ppl
        rep = rdquant.inspect(out)
        print(f"{label} on cuda: compress {t:.1f} s, {rep.bits_per_weight:.3f} bpw, "
              f"method/plain-rounding proxy error {gain:.3f}, reload exact={exact}, ppl(eval text)={ppl:.2f}, "
              f"model on {next(loaded.parameters()).device}")
    enc = tok("the", return_tensors="pt").to("cuda")
    print("generate:", loaded.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id).shape)
    streamed(out, tok)
    claq_layer()


def streamed(path: Path, tok) -> None:
    """The artifact under a GPU budget that streams every block (host -> device on a side stream) against
    the full load with the same (reference) backend: logits and greedy tokens must be identical."""
    from rdquant.artifact import read_manifest
    from rdquant.stream import make_plan, streamer_of

    plan = make_plan(read_manifest(path), None)
    full = rdquant.load(path, device="cuda", backend="reference")
    small = rdquant.load(path, device="cuda", backend="reference",
                         max_memory=plan.fixed + max(plan.slots) + max(plan.blocks))
    ids = tok("the history of", return_tensors="pt")["input_ids"].to("cuda")
    gen = dict(max_new_tokens=16, do_sample=False, pad_token_id=tok.eos_token_id)
    with torch.inference_mode():
        same_logits = torch.equal(full(ids).logits, small(ids).logits)
        same_tokens = torch.equal(full.generate(ids, **gen), small.generate(ids, **gen))
    st = streamer_of(small).stats
    print(f"streamed on cuda ({small._rdquant_plan.describe()}): same logits {same_logits}, same tokens "
          f"{same_tokens}, {st.blocks_read} block reads, {st.wait_s:.3f} s waited")


def claq_layer() -> None:
    """CLAQ on a 1536 x 576 layer (gate/up-sized) on CUDA and on CPU: time and proxy error."""
    from rdquant.methods.claq import claq_quantize
    from rdquant.methods.gptq import gptq_quantize, proxy_error

    g = torch.Generator().manual_seed(0)
    W = torch.distributions.StudentT(4.0).sample((1536, 576)) * 0.02
    X = torch.randn(576, 4096, generator=g) * (torch.rand(576, 1, generator=g) * 2)
    H = 2 * X @ X.t() / X.shape[1]
    cfg = rdquant.CompressConfig(method="claq", target_bits=3.1)
    for dev in ("cuda", "cpu"):
        Wd, Hd = W.to(dev), H.to(dev)
        claq_quantize(Wd[:64], Hd, cfg)  # warm-up
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        (q,), _ = claq_quantize(Wd, Hd, cfg)
        if dev == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter() - t0
        err = proxy_error(W, q.dequantize().cpu(), H)
        ref, _ = gptq_quantize(Wd, Hd, rdquant.CompressConfig(bits=3, group_size=64))
        print(f"claq 3.1 bpw, 1536x576 layer on {dev}: {t:.2f} s, proxy error {err:.4g} "
              f"(gptq 3-bit g64: {proxy_error(W, ref.dequantize().cpu(), H):.4g})")


if __name__ == "__main__":
    main()
