"""The Layout interface: one registry from the manifest's layout name to its class; the runtime, the
pipeline and tuning reach layouts only through it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from rdquant.config import CompressConfig
from rdquant.errors import ArtifactError
from rdquant.layouts import LAYOUTS, LayerSpec, layout_named
from rdquant.methods.rtn import rtn_quantize
from rdquant.runtime import QuantLinear

SRC = Path(__file__).resolve().parents[1] / "src" / "rdquant"


def test_unknown_layout_is_a_named_error():
    with pytest.raises(ArtifactError, match="unknown weight layout 'sparse99'"):
        layout_named("sparse99")
    with pytest.raises(ArtifactError, match="unknown weight layout"):
        QuantLinear.from_manifest({"shape": [4, 8], "bits": 4, "group_size": 8, "symmetric": False, "bias": False,
                                   "layout": "sparse99"})


@pytest.mark.parametrize("symmetric", [False, True])
def test_affine_layer_round_trips_through_its_layout(symmetric):
    W = torch.randn(24, 100)  # ragged last group of 36
    qw = rtn_quantize(W, CompressConfig(method="rtn", bits=3, group_size=64, symmetric=symmetric))
    q = QuantLinear.from_quantized(qw, None)
    layer = LayerSpec(24, 100, 3, 64, symmetric)
    assert set(q.buffer_names) == set(LAYOUTS["affine"].buffers(layer))
    again = QuantLinear.from_manifest({"shape": [24, 100], "bits": 3, "group_size": 64, "symmetric": symmetric, "bias": False})
    again.load_state_dict(q.state_dict())
    assert torch.equal(again.dequantized_weight(), qw.dequantize())
    assert torch.equal(qw.round_to_grid(W), qw.dequantize())  # RTN's codes are the nearest on their grid
    assert "bits=3, group_size=64" in repr(q)


def test_no_branches_on_layout_names_or_types_outside_layouts():
    pattern = re.compile(r"layout\"?\)?\s*[!=]=|get\(\"layout\"\)\s*[!=]=|isinstance\([^)]*(QuantizedWeight|MixedWeight|CodebookWeight)")
    for name in ("runtime.py", "pipeline.py", "tune.py", "loading.py", "coding.py"):
        hits = [l for l in (SRC / name).read_text().splitlines() if pattern.search(l)]
        assert not hits, f"{name} branches on a layout: {hits}"


@pytest.mark.parametrize("shape,group,bits,symmetric", [((40, 200), 64, 3, False), ((33, 96), 48, 4, True),
                                                        ((16, 70), -1, 2, False), ((8, 64), 64, 8, False)])
def test_grouped_dequantization_is_the_expanded_formula_bit_for_bit(shape, group, bits, symmetric):
    """dequantize_grouped (in place, per group, ragged last group) gives exactly (codes - zero) * scale
    with scales and zero points expanded to every column; the affine row lookup gives the same rows."""
    from rdquant import packing
    from rdquant.qtensor import QuantizedWeight, dequantize_codes, expand_groups, num_groups

    g = torch.Generator().manual_seed(1)
    out_f, in_f = shape
    n_g = num_groups(in_f, group)
    codes = torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.uint8)
    scales = (torch.rand(out_f, n_g, generator=g) * 0.02 + 1e-3).half()
    zeros = None if symmetric else torch.randint(0, 1 << bits, (out_f, n_g), generator=g, dtype=torch.uint8)
    q = QuantizedWeight(codes, scales, zeros, bits, group)
    want = dequantize_codes(codes, expand_groups(scales, in_f, group), expand_groups(q.zero_points(), in_f, group))
    assert torch.equal(q.dequantize(), want)
    assert torch.equal(q.dequantize(torch.float16), want.half())
    layer = LayerSpec(out_f, in_f, bits, group, symmetric, {})
    rows = torch.tensor([0, out_f - 1, 3])
    got = layout_named("affine").gather_rows(q.packed_state(), layer, rows)
    assert got is None or torch.equal(got, want[rows])
    assert torch.equal(packing.unpack(packing.pack(codes, bits), bits, codes.numel()), codes.reshape(-1))


@pytest.mark.parametrize("widths", [[3] * 10, [2, 4, 0, 3, 3, 2, 4, 4, 1, 3]])
def test_codebook_segments_round_trip_and_damage_is_named(widths):
    """Column codes pack into one run per width and unpack back (one width: no scatter); a stream of the
    wrong length is a ValueError (the loader's damaged-artifact error)."""
    from rdquant.qcodebook import CodebookWeight, pack_segments, unpack_segments

    g = torch.Generator().manual_seed(2)
    cw = torch.tensor(widths)
    codes = (torch.randint(0, 256, (12, len(widths)), generator=g) % (1 << cw)).to(torch.uint8)
    packed = pack_segments(codes, cw)
    assert torch.equal(unpack_segments(packed, cw, 12), codes)
    with pytest.raises(ValueError, match="widths say"):
        unpack_segments(torch.cat([packed, packed[:1]]), cw, 12)
    entries = int((1 << cw).sum())
    state = {"qweight": packed, "widths": cw.to(torch.uint8), "codebook": torch.randn(entries).half()}
    assert torch.equal(CodebookWeight.from_packed(state, (12, len(widths)), 1).codes, codes)
