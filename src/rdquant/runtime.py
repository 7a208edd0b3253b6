"""Runtime modules: QuantLinear holds the packed artifact tensors and dequantizes on the fly."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import packing
from .qcodebook import STORED as CODEBOOK_BUFFERS, CodebookWeight
from .qmixed import STORED as MIXED_BUFFERS, MixedWeight
from .qtensor import QuantizedWeight, num_groups

AFFINE_BUFFERS = ("qweight", "scales", "qzeros")
QUANT_BUFFERS = tuple(dict.fromkeys(AFFINE_BUFFERS + CODEBOOK_BUFFERS + MIXED_BUFFERS))  # every stored tensor name
RESIZABLE = ("codebook", "mixed")  # layouts whose buffer sizes come from the data


class QuantLinear(nn.Module):
    """A Linear whose weight lives packed, as stored in the artifact, and is dequantized on the fly.

    Three layouts: `affine` (qtensor.py: packed codes + fp16 scales + packed zero points), `codebook`
    (qcodebook.py: codes packed per column width + fp16 column codebooks + optional row scales + fp16
    outliers; `spec` says which of those exist) and `mixed` (qmixed.py: a width per row-group or row-cluster cell). Buffers are named as in the artifact, so the module's
    state_dict is exactly what is stored; codebook buffers take their sizes from what is loaded.
    With `cache_dequantized` the dequantized weight is kept after first use (faster, but costs the
    dense weight's memory).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        symmetric: bool,
        bias: bool,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        spec: dict | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.spec = dict(spec) if spec else None
        self.layout = self.spec["layout"] if self.spec else "affine"
        self.compute_dtype = dtype
        self.cache_dequantized = False
        self._cache: torch.Tensor | None = None
        self._loader: Callable[["QuantLinear"], None] | None = None  # lazy loading (loading.py)
        # allocated, not filled: every buffer is set from the artifact (set_tensors, load_state_dict)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        if self.layout == "codebook":
            empty = lambda dt: torch.zeros(0, dtype=dt, device=device)
            for name, dt in (("qweight", torch.uint8), ("widths", torch.uint8), ("codebook", torch.float16)):
                self.register_buffer(name, empty(dt))
            if self.spec.get("codebook_bits", 16) == 8:
                self.register_buffer("codebook_range", empty(torch.float16))
            if self.spec.get("row_scale"):
                self.register_buffer("row_scale", empty(torch.float16))
            if self.spec.get("outliers"):
                for name, dt in (("outlier_count", torch.int16), ("outlier_row", torch.int16), ("outlier_val", torch.float16)):
                    self.register_buffer(name, empty(dt))
            return
        if self.layout == "mixed":
            for name, dt in (("qweight", torch.uint8), ("qwidths", torch.uint8), ("scales", torch.float16)):
                self.register_buffer(name, torch.zeros(0, dtype=dt, device=device))
            if self.spec.get("grid", "affine") == "affine":  # the companded grid stores no zero points
                self.register_buffer("qzeros", torch.zeros(0, dtype=torch.uint8, device=device))
            if self.spec.get("clusters"):  # row-cluster x column cells
                self.register_buffer("qclusters", torch.zeros(0, dtype=torch.int16, device=device))
            return
        n_g = num_groups(in_features, group_size)
        nbytes = packing.packed_nbytes(in_features * out_features, bits)
        self.register_buffer("qweight", torch.empty(nbytes, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(out_features, n_g, dtype=torch.float16, device=device))
        if not symmetric:
            zbytes = packing.packed_nbytes(out_features * n_g, bits)
            self.register_buffer("qzeros", torch.empty(zbytes, dtype=torch.uint8, device=device))
        else:
            self.qzeros = None

    @classmethod
    def from_quantized(
        cls, qw: "QuantizedWeight | CodebookWeight | MixedWeight", bias: torch.Tensor | None, dtype: torch.dtype = torch.float32
    ) -> "QuantLinear":
        out_f, in_f = qw.shape
        spec = qw.spec() if isinstance(qw, (CodebookWeight, MixedWeight)) else None
        m = cls(in_f, out_f, qw.bits, qw.group_size, qw.symmetric, bias is not None, dtype, qw.codes.device, spec)
        m.set_tensors(qw.packed_state())
        if bias is not None:
            m.bias.data.copy_(bias.to(dtype))
        return m

    @classmethod
    def from_manifest(cls, info: dict, dtype: torch.dtype = torch.float32) -> "QuantLinear":
        """An empty layer shaped by its manifest entry (`quantized[name]`), ready for set_tensors."""
        out_f, in_f = info["shape"]
        spec = info if info.get("layout", "affine") != "affine" else None
        return cls(in_f, out_f, info["bits"], info["group_size"], info["symmetric"], info["bias"], dtype, spec=spec)

    @property
    def buffer_names(self) -> tuple[str, ...]:
        """The stored tensors of this layer's layout that it has."""
        names = {"codebook": CODEBOOK_BUFFERS, "mixed": MIXED_BUFFERS}.get(self.layout, AFFINE_BUFFERS)
        return tuple(n for n in names if getattr(self, n, None) is not None)

    def set_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Put stored tensors in place (codebook buffers take the given sizes)."""
        for k, v in tensors.items():
            if k not in self._buffers or self._buffers[k] is None:
                raise KeyError(f"{k} is not a stored tensor of this {self.layout} layer")
            cur = self._buffers[k]
            if self.layout in RESIZABLE:
                self._buffers[k] = v.to(cur.device).clone()
            else:
                cur.copy_(v)
        self._cache = None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        if self.layout in RESIZABLE:  # sizes come from the data
            for k in self.buffer_names:
                t = state_dict.get(prefix + k)
                if t is not None:
                    self._buffers[k] = torch.empty_like(t, device=self._buffers[k].device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def set_loader(self, loader: Callable[["QuantLinear"], None]) -> None:
        """Defer reading this layer's tensors until the weight is first needed."""
        self._loader = loader

    def materialize(self) -> None:
        if self._loader is not None:
            loader, self._loader = self._loader, None
            loader(self)

    def quantized_weight(self) -> "QuantizedWeight | CodebookWeight | MixedWeight":
        self.materialize()
        if self.layout == "mixed":
            state = {k: getattr(self, k) for k in self.buffer_names}
            return MixedWeight.from_packed(state, (self.out_features, self.in_features), self.group_size,
                                           self.spec["width_bits"], self.spec.get("grid", "affine"))
        if self.layout == "codebook":
            state = {k: getattr(self, k) for k in self.buffer_names}
            return CodebookWeight.from_packed(state, (self.out_features, self.in_features), self.group_size,
                                              self.spec.get("scale_group", -1))
        state = {"qweight": self.qweight, "scales": self.scales}
        if self.qzeros is not None:
            state["qzeros"] = self.qzeros
        return QuantizedWeight.from_packed(
            state, (self.out_features, self.in_features), self.bits, self.group_size
        )

    def dequantized_weight(self) -> torch.Tensor:
        if self._cache is not None:
            return self._cache
        w = self.quantized_weight().dequantize(self.compute_dtype)
        if self.cache_dequantized:
            self._cache = w
        return w

    def clear_cache(self) -> None:
        self._cache = None

    def _apply(self, fn, recurse=True):  # moving the module invalidates the cached weight
        self._cache = None
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight()
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w.to(x.dtype), bias)

    def extra_repr(self) -> str:
        if self.layout == "mixed":
            return (f"in_features={self.in_features}, out_features={self.out_features}, layout=mixed, "
                    f"max_bits={self.bits}, group_size={self.group_size}, bias={self.bias is not None}")
        if self.layout == "codebook":
            return (f"in_features={self.in_features}, out_features={self.out_features}, layout=codebook, "
                    f"max_bits={self.bits}, share={self.group_size}, bias={self.bias is not None}")
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, symmetric={self.symmetric}, bias={self.bias is not None}"
        )


def set_dequant_cache(model: nn.Module, enabled: bool) -> None:
    """Turn the dequantized-weight cache of every QuantLinear on or off (off also frees it)."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.cache_dequantized = enabled
            if not enabled:
                m.clear_cache()
