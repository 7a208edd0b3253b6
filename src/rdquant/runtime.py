"""Runtime modules: QuantLinear holds the packed artifact tensors and dequantizes on the fly."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import adapters
from .adapters import LowRank
from .layouts import STORED, LayerSpec, layout_named

ROW_CHUNK = 1 << 21  # weights of one slice of a large layer the reference backend dequantizes at a time
QUANT_BUFFERS = STORED + adapters.STORED  # every stored tensor name of every layout, and of low-rank adapters


def _spec_of(info: dict) -> dict | None:
    """A manifest entry's layout spec for the constructor: the entry itself, None for a plain affine layer."""
    return info if info.get("layout", "affine") != "affine" or "lowrank" in info else None


def adapter_runner(lr: LowRank, backend: str, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> (x D^T) U^T. On the triton backend quantized factors stay packed and run through the affine
    kernel (4-bit factors read a quarter of fp16's bytes); else they are dequantized to `dtype`."""
    if backend == "triton" and lr.bits < 16:
        from .kernels.matmul_triton import affine_matmul, repack_affine

        pd, pu = (repack_affine(q.codes, q.scales, q.zeros, q.bits, q.group_size) for q in (lr.down, lr.up))
        return lambda x: affine_matmul(affine_matmul(x, pd), pu)
    D, U = lr.matrices(dtype)
    return lambda x: F.linear(F.linear(x, D.to(x.dtype)), U.to(x.dtype))


class QuantLinear(nn.Module):
    """A Linear whose weight lives packed, as stored in the artifact, and is dequantized on the fly.

    The packed format is its `layout` (layouts/: affine groups, mixed-width cells, column codebooks,
    2:4 sparse), reached only through the Layout interface; low-rank adapters (`spec["lowrank"]`,
    adapters.py) may sit beside any layout and add (x D^T) U^T to the output. Buffers are named as in the artifact, so the module's
    state_dict is exactly what is stored; layouts sized by their data take the sizes that are loaded.
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
        self.layout = layout_named((self.spec or {}).get("layout", "affine"))
        self.lowrank: dict | None = (self.spec or {}).get("lowrank")
        self.layer = LayerSpec(out_features, in_features, bits, group_size, symmetric, self.spec or {})
        self.compute_dtype = dtype
        self.backend = "reference"  # reference | cached | a kernel the layout has (backends.py chooses)
        self._cache: torch.Tensor | None = None
        self._kernel = None  # the layer repacked for its kernel backend
        self._home: torch.device | None = None  # where the stored tensors belong while they wait in host memory
        self._loader: Callable[["QuantLinear"], None] | None = None  # lazy loading (loading.py)
        # allocated, not filled: every buffer is set from the artifact (set_tensors, load_state_dict)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        for name, (dt, shape) in self.layout.buffers(self.layer).items():
            self.register_buffer(name, torch.empty(shape, dtype=dt, device=device))
        if self.lowrank:
            for name, (dt, shape) in adapters.buffers(self.lowrank, in_features, out_features).items():
                self.register_buffer(name, torch.empty(shape, dtype=dt, device=device))
        self._adapter_cache: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._rows_ok: bool | None = None  # the layout's row lookup works for this layer (_rowwise)

    kind = "linear"  # linear | head (the output head, outside the decoder blocks) | embedding

    def table_entry(self) -> dict[str, Any]:
        """This layer's row of the manifest's quantized-module table (without the method)."""
        entry = {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
                 "shape": [self.out_features, self.in_features], "bias": self.bias is not None, **(self.spec or {})}
        if self.kind != "linear":
            entry["kind"] = self.kind
        return entry

    @classmethod
    def from_quantized(cls, qw, bias: torch.Tensor | None, dtype: torch.dtype = torch.float32,
                       lowrank: LowRank | None = None) -> "QuantLinear":
        """A layer holding a method's result (any layout's weight object), with its adapters if any."""
        out_f, in_f = qw.shape
        spec = qw.spec()
        if lowrank is not None:
            spec = {**(spec or {}), "lowrank": lowrank.spec()}
        m = cls(in_f, out_f, qw.bits, qw.group_size, qw.symmetric, bias is not None, dtype, qw.codes.device, spec)
        m.set_tensors({**qw.packed_state(), **(lowrank.packed_state() if lowrank is not None else {})})
        if bias is not None:
            m.bias.data.copy_(bias.to(dtype))
        return m

    @classmethod
    def from_manifest(cls, info: dict, dtype: torch.dtype = torch.float32) -> "QuantLinear":
        """An empty layer shaped by its manifest entry (`quantized[name]`), ready for set_tensors."""
        out_f, in_f = info["shape"]
        m = cls(in_f, out_f, info["bits"], info["group_size"], info["symmetric"], info["bias"], dtype,
                spec=_spec_of(info))
        m.kind = info.get("kind", "linear")
        return m

    @property
    def buffer_names(self) -> tuple[str, ...]:
        """The stored tensors of this layer (its layout's, then its adapters') that it has."""
        return tuple(n for n in self.layout.stored + adapters.STORED if getattr(self, n, None) is not None)

    def set_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Put stored tensors in place (layouts sized by their data take the given sizes)."""
        for k, v in tensors.items():
            if k not in self._buffers or self._buffers[k] is None:
                raise KeyError(f"{k} is not a stored tensor of this {self.layout.name} layer")
            cur = self._buffers[k]
            if self.layout.resizable:
                self._buffers[k] = v.to(cur.device).clone()
            else:
                cur.copy_(v)
        self.clear_cache()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        if self.layout.resizable:  # sizes come from the data
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

    def quantized_weight(self):
        """The layer's weight object (its layout's: dequantize, packed_state, round_to_grid). Stored
        tensors that do not fit the layer's manifest entry are an ArtifactError, not a crash."""
        self.materialize()
        self._restore_stored()
        try:
            return self.layout.weight({k: getattr(self, k) for k in self.buffer_names if k in self.layout.stored},
                                      self.layer)
        except (ValueError, TypeError, IndexError, ZeroDivisionError, RuntimeError) as e:
            from .errors import ArtifactError, first_line

            raise ArtifactError(f"a {self.layout.name} layer's stored tensors do not fit its manifest entry "
                                f"({first_line(e)}): the artifact is damaged") from e

    @property
    def device(self) -> torch.device:
        """The device the layer computes on (its stored tensors may wait in host memory meanwhile)."""
        return self._home or self.qweight.device

    @property
    def cache_dequantized(self) -> bool:
        """Whether the dequantized weight is kept after first use (the `cached` backend)."""
        return self.backend == "cached"

    @cache_dequantized.setter
    def cache_dequantized(self, enabled: bool) -> None:
        self.set_backend("cached" if enabled else "reference")

    def set_backend(self, backend: str) -> None:
        """reference: dequantize on every call (exact, least memory); cached: dequantize once and keep
        it; a kernel of the layout (e.g. triton): matmul from the packed form, repacked at first use."""
        if backend not in ("reference", "cached") and not self.layout.kernel_supports(self.layer, backend):
            raise ValueError(f"the {self.layout.name} layout has no {backend} kernel for this layer")
        self.backend = backend
        self._restore_stored()
        self._cache = None
        self._kernel = None

    def _offload_stored(self) -> None:
        """With the repacked form on the GPU, the stored tensors wait in host memory (they serve
        state_dict, saving and other backends): the layer holds its weight on the GPU once, not twice."""
        dev = self.qweight.device
        if dev.type == "cpu" or self._home is not None:
            return
        for k in self.buffer_names:
            self._buffers[k] = self._buffers[k].to("cpu")
        self._home = dev

    def _restore_stored(self) -> None:
        if self._home is not None:
            home, self._home = self._home, None
            for k in self.buffer_names:
                self._buffers[k] = self._buffers[k].to(home)

    def low_rank(self) -> LowRank | None:
        """The layer's adapter factors (None without adapters)."""
        if not self.lowrank:
            return None
        self.materialize()
        self._restore_stored()
        try:
            return LowRank.from_packed({k: getattr(self, k) for k in adapters.STORED if getattr(self, k, None) is not None},
                                       self.lowrank, self.in_features, self.out_features)
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            from .errors import ArtifactError, first_line

            raise ArtifactError(f"a layer's low-rank adapters do not fit its manifest entry ({first_line(e)}): "
                                "the artifact is damaged") from e

    def effective_weight(self) -> torch.Tensor:
        """The weight the layer applies, adapters included (float32 [out, in])."""
        W = self.quantized_weight().dequantize(torch.float32)
        lr = self.low_rank()
        return W if lr is None else W + lr.delta().to(W.device)

    def _adapter_out(self, x: torch.Tensor) -> torch.Tensor:
        """(x D^T) U^T: the adapters' share of the output."""
        run = self._adapter_cache
        if run is None:
            run = adapter_runner(self.low_rank(), self.backend, self.compute_dtype)  # type: ignore[arg-type]
            if self.backend != "reference":
                self._adapter_cache = run
        return run(x)

    def dequantized_weight(self) -> torch.Tensor:
        if self._cache is not None:
            return self._cache
        w = self.quantized_weight().dequantize(self.compute_dtype)
        if self.backend == "cached":
            self._cache = w
        return w

    def clear_cache(self) -> None:
        self._cache = None
        self._kernel = None
        self._adapter_cache = None

    def _apply(self, fn, recurse=True):  # moving the module invalidates the cached / repacked weight
        self._restore_stored()
        self.clear_cache()
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = None
        if self.backend in ("reference", "cached"):
            if self.in_features * self.out_features > ROW_CHUNK:
                y = self._rowwise(x, bias)
            if y is None:
                y = F.linear(x, self.dequantized_weight().to(x.dtype), bias)
        else:
            if self._kernel is None:
                if self.lowrank:  # the factors, kept on the device before the stored tensors move out
                    self._adapter_cache = adapter_runner(self.low_rank(), self.backend, self.compute_dtype)  # type: ignore[arg-type]
                self._kernel = self.layout.prepare_kernel(self.quantized_weight(), self.backend)
                self._offload_stored()
            y = self.layout.kernel_linear(x, self._kernel, self.backend)
            y = y if bias is None else y + bias
        return y + self._adapter_out(x) if self.lowrank else y

    def _check_shapes(self) -> None:
        """Row lookups read the stored tensors directly: check their shapes as loading would."""
        if self.layout.resizable:
            return
        for k, (_, shape) in self.layout.buffers(self.layer).items():
            t = getattr(self, k, None)
            if t is not None and tuple(t.shape) != tuple(shape):
                from .errors import ArtifactError

                raise ArtifactError(f"the {self.kind} layer's {k} has shape {tuple(t.shape)}, its manifest entry says "
                                    f"{tuple(shape)}: the artifact is damaged")

    def _rowwise(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        """x W^T a slice of output rows at a time: the reference backend dequantizes each slice alone (the
        layout's row lookup), so a large layer (a vocabulary head) never holds its whole dense weight;
        the cached backend multiplies the same slices of its cached weight, so the two agree bit for bit
        (a matmul's rounding depends on its width). None where the layout has no row lookup."""
        gather = getattr(self.layout, "gather_rows", None)
        if gather is None:
            return None
        self.materialize()
        self._check_shapes()
        state = {k: getattr(self, k) for k in self.buffer_names if k in self.layout.stored}
        dev = self.qweight.device
        if self._rows_ok is None:  # whether the stored rows can be read alone (whole bytes per row)
            self._rows_ok = gather(state, self.layer, torch.zeros(1, dtype=torch.long, device=dev)) is not None
        if not self._rows_ok:
            return None
        cached = self.dequantized_weight() if self.backend == "cached" else None
        step = max(1, ROW_CHUNK // self.in_features)
        parts = []
        for start in range(0, self.out_features, step):
            stop = min(start + step, self.out_features)
            W = cached[start:stop] if cached is not None else gather(
                state, self.layer, torch.arange(start, stop, device=dev)).to(self.compute_dtype)
            parts.append(F.linear(x, W.to(x.dtype)))
        y = torch.cat(parts, dim=-1)
        return y if bias is None else y + bias

    def extra_repr(self) -> str:
        lr = f", lowrank={self.lowrank['rank']} ({self.lowrank['bits']}-bit)" if self.lowrank else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.layout.describe(self.layer)}, "
                f"bias={self.bias is not None}{lr}")


class QuantEmbedding(QuantLinear):
    """A token embedding stored as a quantized [vocab, hidden] matrix (row-wise groups along the
    hidden size), whose forward looks rows up: only the rows asked for are unpacked and dequantized
    (the `cached` backend keeps the whole dequantized matrix instead). With a tied head, the head is a
    QuantLinear holding the very same stored tensors."""

    kind = "embedding"

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, group_size: int, symmetric: bool,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None, spec: dict | None = None,
                 padding_idx: int | None = None) -> None:
        super().__init__(embedding_dim, num_embeddings, bits, group_size, symmetric, False, dtype, device, spec)
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.tied_head: str | None = None  # the head module sharing these tensors, if any
        self.embed_scale = 1.0  # rows are multiplied by it on lookup (Gemma scales by sqrt(hidden))

    @classmethod
    def from_manifest(cls, info: dict, dtype: torch.dtype = torch.float32) -> "QuantEmbedding":
        out_f, in_f = info["shape"]
        m = cls(out_f, in_f, info["bits"], info["group_size"], info["symmetric"], dtype, spec=_spec_of(info))
        m.tied_head = info.get("tied_head")
        m.embed_scale = float(info.get("embed_scale", 1.0))
        return m

    def table_entry(self) -> dict[str, Any]:
        entry = super().table_entry()  # kind "embedding" included
        if self.tied_head:
            entry["tied_head"] = self.tied_head
        if self.embed_scale != 1.0:
            entry["embed_scale"] = self.embed_scale
        return entry

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self._lookup(ids)
        return out if self.embed_scale == 1.0 else out * self.embed_scale

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if self.backend == "cached":
            return F.embedding(ids, self.dequantized_weight())
        self.materialize()
        self._restore_stored()
        self._check_shapes()
        rows = ids.reshape(-1).to(self.qweight.device)
        gather = getattr(self.layout, "gather_rows", None)
        out = gather({k: getattr(self, k) for k in self.buffer_names}, self.layer, rows) if gather else None
        if out is None:  # a layout or width without a row lookup: dequantize, then index
            out = self.quantized_weight().dequantize(torch.float32)[rows]
        return out.to(self.compute_dtype).view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.layout.describe(self.layer)}"


def set_dequant_cache(model: nn.Module, enabled: bool) -> None:
    """Turn the dequantized-weight cache of every QuantLinear on or off (off also frees it)."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.cache_dequantized = enabled
