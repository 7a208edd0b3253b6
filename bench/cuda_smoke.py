"""The pipeline on an NVIDIA GPU: compress a tiny random Llama with GPTQ on CUDA, save, reload on
CUDA, check bit-exact reload and generate. Run on the device machine:

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
    for bits in (4, 3, 2):
        model, tok, mid = load_model(str(src))
        cfg = rdquant.CompressConfig(bits=bits, group_size=64, calib_samples=64, calib_seqlen=256, device="cuda")
        t0 = time.perf_counter()
        cm = rdquant.compress(model, cfg, tokenizer=tok, model_id=mid, progress=False)
        t = time.perf_counter() - t0
        out = cm.save(tmp / f"w{bits}")
        loaded = rdquant.load(out, device="cuda")
        exact = all(torch.equal(m.dequantized_weight().cpu(), loaded.get_submodule(n).dequantized_weight().cpu())
                    for n, m in cm.model.named_modules() if isinstance(m, QuantLinear))
        gain = sum(l.proxy_error for l in cm.logs) / sum(l.proxy_error_rtn for l in cm.logs)
        ppl = rdquant.evaluate(str(out), data=str(src / "eval.txt"), seqlen=128, max_windows=4,
                               device="cuda", progress=False).ppl
        rep = rdquant.inspect(out)
        print(f"{bits}-bit g64 on cuda: compress {t:.1f} s, {rep.bits_per_weight:.3f} bpw, "
              f"GPTQ/RTN proxy error {gain:.3f}, reload exact={exact}, ppl(eval text)={ppl:.2f}, "
              f"model on {next(loaded.parameters()).device}")
    enc = tok("the", return_tensors="pt").to("cuda")
    print("generate:", loaded.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id).shape)


if __name__ == "__main__":
    main()
