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
