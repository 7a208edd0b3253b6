"""Runtime modules: QuantLinear holds the packed artifact tensors and dequantizes on the fly."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import packing
from .qtensor import QuantizedWeight, num_groups


class QuantLinear(nn.Module):
    """A Linear whose weight lives as packed codes + fp16 scales (+ packed zero points).

    Buffers are named as in the artifact (qweight, scales, qzeros), so the module's state_dict is
    exactly what is stored. With `cache_dequantized` the dequantized weight is kept after first use
    (faster, but costs the dense weight's memory).
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
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.compute_dtype = dtype
        self.cache_dequantized = False
        self._cache: torch.Tensor | None = None
        self._loader: Callable[["QuantLinear"], None] | None = None  # lazy loading (loading.py)
        n_g = num_groups(in_features, group_size)
        nbytes = packing.packed_nbytes(in_features * out_features, bits)
        self.register_buffer("qweight", torch.zeros(nbytes, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, n_g, dtype=torch.float16, device=device))
        if not symmetric:
            zbytes = packing.packed_nbytes(out_features * n_g, bits)
            self.register_buffer("qzeros", torch.zeros(zbytes, dtype=torch.uint8, device=device))
        else:
            self.qzeros = None
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_quantized(
        cls, qw: QuantizedWeight, bias: torch.Tensor | None, dtype: torch.dtype = torch.float32
    ) -> "QuantLinear":
        out_f, in_f = qw.shape
        m = cls(in_f, out_f, qw.bits, qw.group_size, qw.symmetric, bias is not None, dtype, qw.codes.device)
        state = qw.packed_state()
        m.qweight.copy_(state["qweight"])
        m.scales.copy_(state["scales"])
        if m.qzeros is not None:
            m.qzeros.copy_(state["qzeros"])
        if bias is not None:
            m.bias.data.copy_(bias.to(dtype))
        return m

    def set_loader(self, loader: Callable[["QuantLinear"], None]) -> None:
        """Defer reading this layer's tensors until the weight is first needed."""
        self._loader = loader

    def materialize(self) -> None:
        if self._loader is not None:
            loader, self._loader = self._loader, None
            loader(self)

    def quantized_weight(self) -> QuantizedWeight:
        self.materialize()
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
