"""Triton kernels, run on the CPU by Triton's interpreter (TRITON_INTERPRET=1) at small shapes: every
width and group size the affine kernel claims (ragged last groups, symmetric and asymmetric) against
the reference dequantize-then-matmul; and a whole artifact on the triton backend against reference.
The GPU speed and the same checks at real shapes are bench/speed.py's."""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

# the interpreter is chosen when triton is first imported: before any test module imports it. Only an
# explicit backend="triton" uses it on the CPU (`auto` takes kernels on CUDA devices only)
if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="the triton package is not installed (it is in the test extra)")


@pytest.fixture(scope="module")
def kernel():
    """The kernel module, under the interpreter."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before this module could select its CPU interpreter")
    return importlib.import_module("rdquant.kernels.affine_triton")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 64, 128, -1])
@pytest.mark.parametrize("symmetric", [False, True])
def test_affine_kernel_matches_the_reference(kernel, bits, group, symmetric):
    from rdquant.qtensor import QuantizedWeight, num_groups

    g = torch.Generator().manual_seed(bits * 100 + group)
    N, K = 40, 200  # 200 is not a multiple of 32, 64 or 128: ragged last groups
    n_g = num_groups(K, group)
    qw = QuantizedWeight(torch.randint(0, 1 << bits, (N, K), generator=g, dtype=torch.uint8),
                         (torch.rand(N, n_g, generator=g) * 0.05 + 0.01).half(),
                         None if symmetric else torch.randint(0, 1 << bits, (N, n_g), generator=g, dtype=torch.uint8),
                         bits, group)
    p = kernel.repack(qw.codes, qw.scales, qw.zeros, bits, group)
    for M in (1, 5, 17):
        x = torch.randn(M, K, generator=g)
        ref = x @ qw.dequantize().T
        for split_k in (1, 3, None):  # K slices meeting in an fp32 output (decode) and the default
            y = kernel.affine_matmul(x, p, block_n=16, block_k=32, split_k=split_k)
            assert float((y - ref).abs().max()) <= 1e-5 * float(ref.abs().max()), split_k


def test_artifact_on_the_triton_backend_matches_reference(kernel, tiny_model_dir, tmp_path, monkeypatch):
    import rdquant

    cfg = rdquant.CompressConfig(bits=3, group_size=48, calib_samples=2, calib_seqlen=16)
    out = rdquant.compress(str(tiny_model_dir), cfg, progress=False).save(tmp_path / "a")
    ref = rdquant.load(out, backend="reference")
    fast = rdquant.load(out, backend="triton")
    assert {q.backend for q in fast.modules() if type(q).__name__ == "QuantLinear"} == {"triton"}
    x = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        a, b = ref(x).logits, fast(x).logits
    assert float((a - b).abs().max()) <= 1e-4 * float(a.abs().max())
    tok = rdquant.load_tokenizer(out)
    enc = tok("the", return_tensors="pt")
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id)
    assert torch.equal(ref.generate(**enc, **kw), fast.generate(**enc, **kw))
