"""Packed weight layouts behind one interface (`Layout`), and the registry that maps the manifest's
layout name to its class. The runtime, the pipeline and tuning reach a layout only through this
interface: a new layout is one module here plus one registry line.

Each layout knows: which tensors it stores and how to allocate them from a manifest entry (`buffers`),
how to turn those tensors into its weight object (`weight`, which has `dequantize`, `packed_state`,
`round_to_grid`), how to describe a layer (`describe`), and which values distillation tuning may move
(`tuning`, None when it has none).
"""

from __future__ import annotations

from .affine import Affine
from .base import Layout, LayerSpec
from .codebook import Codebook
from .kquant import KQuant
from .mixed import Mixed
from .sparse24 import Sparse24, SparseHalf

LAYOUTS: dict[str, type[Layout]] = {cls.name: cls for cls in (Affine, Mixed, Codebook, Sparse24, SparseHalf, KQuant)}
STORED = tuple(dict.fromkeys(n for cls in LAYOUTS.values() for n in cls.stored))  # every stored tensor name


def layout_named(name: str) -> type[Layout]:
    """The layout class of a manifest's layout name (a named error for one this rdquant does not know)."""
    try:
        return LAYOUTS[name]
    except KeyError:
        from ..errors import ArtifactError

        raise ArtifactError(f"unknown weight layout {name!r} (written by a newer rdquant?); known: "
                            + ", ".join(LAYOUTS)) from None


def layout_of(weight) -> type[Layout]:
    """The layout class of a weight object (QuantizedWeight, MixedWeight, CodebookWeight, Sparse24Weight, SparseHalfWeight, KQuantWeight)."""
    return layout_named(getattr(weight, "layout", "affine"))


__all__ = ["Affine", "Codebook", "KQuant", "LAYOUTS", "LayerSpec", "Layout", "Mixed", "STORED", "Sparse24", "SparseHalf", "layout_named", "layout_of"]
