"""The pipeline on an NVIDIA GPU: compress a tiny random Llama with GPTQ and CLAQ on CUDA, save,
reload on CUDA, check bit-exact reload and generate; stream the last artifact's blocks under a GPU
memory budget (`max_memory`) and compare logits and greedy tokens with the full load; then CLAQ on one
default-model-sized layer on CUDA vs CPU. Run on the device machine:

    PYTHONPATH=src python3 bench/cuda_smoke.py
    RDQ_SMOKE_DEVICE=cpu python bench/cuda_smoke.py   # a dry run of the same steps on the CPU
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

import rdquant
from rdquant.data import read_documents
from rdquant.models import load_model
from rdquant.runtime import QuantLinear
from rdquant.testing import save_tiny_model_dir

DEV = os.environ.get("RDQ_SMOKE_DEVICE", "cuda")


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    if DEV == "cuda":
        assert torch.cuda.is_available(), "needs a CUDA GPU (RDQ_SMOKE_DEVICE=cpu: a dry run on the CPU)"
        print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
    tmp = Path(tempfile.mkdtemp())
    src = save_tiny_model_dir(tmp / "tiny", "llama", hidden=256, intermediate=704, layers=4)
    (src / "eval.txt").write_text("\n\n".join(read_documents(None)[100:160]))
    jobs = [(f"{b}-bit g64", dict(bits=b, group_size=64)) for b in (4, 3, 2)]
    jobs += [("claq 3.1 bpw", dict(method="claq", target_bits=3.1)),
             ("claq 2-bit +0.5% outliers", dict(method="claq", bits=2, claq_outlier_frac=0.005)),
             ("cvxq 3.0 bpw", dict(method="cvxq", target_bits=3.0, group_size=64)),
             ("slim 2:4 + adapters r=10%", dict(method="slim", group_size=64, lowrank=0.1))]
    for label, kw in jobs:
        model, tok, mid = load_model(str(src))
        cfg = rdquant.CompressConfig(calib_samples=64, calib_seqlen=256, device=DEV, **kw)
        t0 = time.perf_counter()
        cm = rdquant.compress(model, cfg, tokenizer=tok, model_id=mid, progress=False)
        t = time.perf_counter() - t0
        out = cm.save(tmp / "".join(c if c.isalnum() else "_" for c in label))
        loaded = rdquant.load(out, device=DEV)
        exact = all(torch.equal(m.dequantized_weight().cpu(), loaded.get_submodule(n).dequantized_weight().cpu())
                    for n, m in cm.model.named_modules() if isinstance(m, QuantLinear))
        logs = [l for l in cm.logs if l.proxy_error is not None and l.proxy_error_rtn is not None]
        gain = sum(l.proxy_error for l in logs) / sum(l.proxy_error_rtn for l in logs)
        ppl = rdquant.evaluate(str(out), data=str(src / "eval.txt"), seqlen=128, max_windows=4,
                               device=DEV, progress=False).ppl
        rep = rdquant.inspect(out)
        print(f"{label} on {DEV}: compress {t:.1f} s, {rep.bits_per_weight:.3f} bpw, "
              f"method/plain-rounding proxy error {gain:.3f}, reload exact={exact}, ppl(eval text)={ppl:.2f}, "
              f"model on {next(loaded.parameters()).device}", flush=True)
        streamed(out, tok, label)  # every layout streamed on the GPU
    enc = tok("the", return_tensors="pt").to(DEV)
    print("generate:", loaded.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id).shape)
    stream_speed(tmp)
    claq_layer()


def streamed(path: Path, tok, label: str) -> None:
    """The artifact under a GPU budget that streams every block (host -> device on a side stream) against
    the full load with the same (reference) backend: logits and greedy tokens must be identical."""
    from rdquant.artifact import read_manifest
    from rdquant.stream import make_plan, streamer_of

    plan = make_plan(read_manifest(path), None)
    full = rdquant.load(path, device=DEV, backend="reference")
    small = rdquant.load(path, device=DEV, backend="reference",
                         max_memory=plan.fixed + max(plan.slots) + max(plan.blocks))
    ids = tok("the history of", return_tensors="pt")["input_ids"].to(DEV)
    gen = dict(max_new_tokens=16, do_sample=False, pad_token_id=tok.eos_token_id)
    with torch.inference_mode():
        same_logits = torch.equal(full(ids).logits, small(ids).logits)
        same_tokens = torch.equal(full.generate(ids, **gen), small.generate(ids, **gen))
    st = streamer_of(small).stats
    print(f"{label} streamed on {DEV} ({small._rdquant_plan.describe()}): same logits {same_logits}, same tokens "
          f"{same_tokens}, {st.blocks_read} block reads, {st.wait_s:.3f} s waited")


def stream_speed(tmp: Path) -> None:
    """A default-model-shaped random Llama (hidden 576, MLP 1536, 30 blocks, vocab 49152, tied), RTN 4-bit
    g64 with a 4-bit embedding, packed and coded (`codec="auto"`): greedy tokens/s on CUDA fully loaded and
    with a budget of 50% of the packed model, storage simulated at 0.25 / 1 / 3 GB/s (issue 24's GPU rows)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from rdquant.artifact import read_manifest
    from rdquant.stream import Storage, make_plan, streamer_of
    from rdquant.testing import tiny_tokenizer

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    model = AutoModelForCausalLM.from_config(cfg).eval()
    cm = rdquant.compress(model, rdquant.CompressConfig(method="rtn", bits=4, group_size=64, embed_bits=4),
                          tokenizer=tok, progress=False, model_id="random-smollm2-shape")
    paths = {"packed": cm.save(tmp / "rand_packed"), "coded": cm.save(tmp / "rand_coded", codec="auto")}
    budget = make_plan(read_manifest(paths["packed"]), None).total // 2
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]], device=DEV)
    gen = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=0)
    for name, path in paths.items():
        rows = [("full", None, None)] + [("50%", budget, bw) for bw in (0.25e9, 1e9, 3e9)]
        ref = None
        for label, mm, bw in rows:
            m = rdquant.load(path, device=DEV, backend="reference", max_memory=mm, storage=Storage(bandwidth=bw))
            with torch.inference_mode():
                m.generate(ids, **{**gen, "max_new_tokens": 2, "min_new_tokens": 2})
                sync()
                t0 = time.perf_counter()
                out = m.generate(ids, **gen)
                sync()
                tps = 64 / (time.perf_counter() - t0)
            ref = out if ref is None else ref
            st = streamer_of(m)
            extra = "" if st is None else (f", {st.stats.bytes_read / 2**20 / 66:.1f} MiB read/token, "
                                           f"decode {st.stats.decode_s:.2f} s, waited {st.stats.wait_s:.2f} s")
            print(f"stream speed {name} {label} {'' if bw is None else f'{bw / 1e9:g} GB/s'}: {tps:.1f} tokens/s, "
                  f"same tokens {torch.equal(out, ref)}{extra}", flush=True)
            del m


def claq_layer() -> None:
    """CLAQ on a 1536 x 576 layer (gate/up-sized) on CUDA and on CPU: time and proxy error."""
    from rdquant.methods.claq import claq_quantize
    from rdquant.methods.gptq import gptq_quantize, proxy_error

    g = torch.Generator().manual_seed(0)
    W = torch.distributions.StudentT(4.0).sample((1536, 576)) * 0.02
    X = torch.randn(576, 4096, generator=g) * (torch.rand(576, 1, generator=g) * 2)
    H = 2 * X @ X.t() / X.shape[1]
    cfg = rdquant.CompressConfig(method="claq", target_bits=3.1)
    for dev in dict.fromkeys((DEV, "cpu")):
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
