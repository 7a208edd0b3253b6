"""CPU backends: torch's int4 kernel for the 4-bit affine layers it fits (by name, or by `auto` where
the exact `cached` path does not fit in memory); its outputs match dequantize-then-matmul within 1e-2
(bfloat16 activations), and a layer it does not fit is refused by name."""

from __future__ import annotations

import pytest
import torch

import rdquant
from rdquant.kernels import int4_cpu

pytestmark = pytest.mark.skipif(not int4_cpu.available(), reason="this torch has no CPU int4 kernel")


def _backends(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for q in model.modules():
        if type(q).__name__ == "QuantLinear":
            counts[q.backend] = counts.get(q.backend, 0) + 1
    return counts


@pytest.mark.parametrize("group", [32, 64])
def test_int4_kernel_matches_the_reference(group):
    from rdquant.qtensor import QuantizedWeight

    g = torch.Generator().manual_seed(group)
    N, K = 48, 192
    for zeros in (torch.randint(0, 16, (N, K // group), generator=g, dtype=torch.uint8), None):
        qw = QuantizedWeight(torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8),
                             (torch.rand(N, K // group, generator=g) * 0.05 + 0.01).half(), zeros, 4, group)
        p = int4_cpu.repack(qw.codes, qw.scales, qw.zeros, group)
        for M in (1, 7):
            x = torch.randn(M, K, generator=g)
            ref = x @ qw.dequantize().T
            y = int4_cpu.matmul(x, p)
            assert y.dtype == x.dtype and float((y - ref).abs().max()) <= 1e-2 * float(ref.abs().max())


def test_auto_takes_the_int4_kernel_where_memory_is_short(tiny_model_dir, tmp_path, monkeypatch):
    """`auto` keeps the exact `cached` path while it fits; where it does not, torch's int4 kernel (as small
    as `reference`, and faster) for the layers it fits; `int4-cpu` by name everywhere it fits."""
    import rdquant.backends as backends

    cfg = rdquant.CompressConfig(bits=4, group_size=32, calib_samples=2, calib_seqlen=16, embed_bits=4)
    out = rdquant.compress(str(tiny_model_dir), cfg, progress=False).save(tmp_path / "a")
    ref = rdquant.load(out, backend="reference")
    n = sum(_backends(ref).values())
    monkeypatch.setattr(backends, "available_memory", lambda device: 10**12)
    assert _backends(rdquant.load(out)) == {"cached": n}
    monkeypatch.setattr(backends, "available_memory", lambda device: 1000)
    assert _backends(rdquant.load(out)) == {"int4-cpu": n}
    fast = rdquant.load(out, backend="int4-cpu")
    assert _backends(fast) == {"int4-cpu": n}
    x = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        a, b = ref(x).logits, fast(x).logits
    assert float((a - b).abs().max()) <= 1e-2 * float(a.abs().max())
    tok = rdquant.load_tokenizer(out)
    enc = tok("the", return_tensors="pt")
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    assert torch.equal(ref.generate(**enc, **kw), fast.generate(**enc, **kw))
    # a layer the kernel does not fit (3 bits, or a ragged group) is refused by name, not run wrong
    three = rdquant.compress(str(tiny_model_dir), cfg.replace(bits=3, embed_bits=16), progress=False).save(tmp_path / "b")
    with pytest.raises(rdquant.RdquantError, match="backend int4-cpu cannot run affine layers with 3-bit codes"):
        rdquant.load(three, backend="int4-cpu")
    assert set(_backends(rdquant.load(three))) <= {"cached", "reference"}
