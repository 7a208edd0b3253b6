"""Layer-input statistics: H = 2 X^T X / n accumulated in float32 over calibration tokens."""

from __future__ import annotations

import torch

from .errors import RdquantError


_WIDE_MM = "out_dtype" in (torch.mm.__doc__ or "") or hasattr(torch.ops.aten.mm, "dtype")


class HessianAccumulator:
    """Running mean of 2 x x^T over the rows x of every input batch (GPTQ's add_batch).

    Only the upper block triangle is accumulated (row panels H[i, i:] += X_i^T X[:, i:]), which
    skips most of the redundant lower half of the product; `H` mirrors it once when read.
    """

    def __init__(self, n_features: int, device: torch.device | str = "cpu", panels: int | None = None) -> None:
        self._upper = torch.zeros(n_features, n_features, dtype=torch.float32, device=device)
        self._sum = torch.zeros(n_features, dtype=torch.float64, device=device)
        self.n = 0
        k = panels if panels is not None else (4 if n_features >= 256 else 1)
        self._edges = [round(i * n_features / k) for i in range(k + 1)]

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        # 16-bit inputs on a GPU: their products are exact in fp32, so a 16-bit GEMM that accumulates
        # and writes fp32 computes what the fp32 GEMM would, on the tensor cores (~10x faster)
        wide = _WIDE_MM and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
        if not wide:
            x = x.to(torch.float32)
        m = x.shape[0]
        self._sum += x.sum(0, dtype=torch.float64)
        self._upper.mul_(self.n / (self.n + m))
        self.n += m
        e = self._edges
        for a, b in zip(e[:-1], e[1:]):
            if wide:
                self._upper[a:b, a:].add_(torch.mm(x[:, a:b].t(), x[:, a:], out_dtype=torch.float32), alpha=2.0 / self.n)
            else:
                self._upper[a:b, a:].addmm_(x[:, a:b].t(), x[:, a:], alpha=2.0 / self.n)

    @property
    def mean(self) -> torch.Tensor:
        """E[x] over the rows seen (float32): what bias correction multiplies the weight error by."""
        return (self._sum / max(self.n, 1)).to(torch.float32)

    @property
    def H(self) -> torch.Tensor:
        """The full symmetric Hessian [n_features, n_features]: the accumulator's own storage with its lower
        triangle filled from the upper one, panel by panel, so reading it costs no full-size copy (one
        fp32 [in, in] matrix is 0.8 GB at 14k inputs, 3.3 GB at 28k). Adding batches after reading stays
        exact (only the upper triangle accumulates); callers that edit H copy it first."""
        U, e = self._upper, self._edges
        for a, b in zip(e[:-1], e[1:]):
            D = U[a:b, a:b]  # a panel's diagonal block is computed whole: keep its upper triangle, mirrored
            D.copy_(torch.triu(D) + torch.triu(D, 1).t())
            U[a:b, :a].copy_(U[:a, a:b].t())
        return U

    def check_finite(self, name: str) -> None:
        """NaN/Inf anywhere in the inputs shows up in H: one cheap check instead of one per batch."""
        if not torch.isfinite(self._upper).all():
            raise RdquantError(
                f"non-finite (NaN/Inf) activations reach {name}: the model overflows on the "
                "calibration data in this dtype; load it in float32 or check the checkpoint"
            )
