"""A size-targeted mix of llama.cpp types (`--method cvxq --grid gguf --target-size ...`): CVXQ's allocation with
the GGUF types as its menu, one type per linear. Each layer's distortion at each type is measured, not modelled:
D_l(t) = sum over its weights of G^2 (W - Q_t(W))^2, Q_t plain rounding in type t's grid and G^2 CVXQ's
sensitivity; its rate is the type's exact bytes. One multiplier lambda picks every layer's type,
t_l = argmin_t D_l(t) + lambda R_l(t), found by bisection so the linears fit the budget, then the budget left
is spent on the upgrades that buy the most distortion per bit. Each layer is then solved by GPTQ (or RTN) in its
type's own grid, so the GGUF export holds the artifact exactly.

Menu: rows of whole 256-weight super-blocks take Q2_K, Q3_K, Q4_K, Q5_K, Q6_K or Q8_0; other rows (a multiple of
32) the block-32 types Q4_0, Q5_0, Q8_0, as llama.cpp's fallbacks do.
"""

from __future__ import annotations

import dataclasses

import torch

from .. import kquant
from ..config import CompressConfig
from ..errors import RdquantError

KQUANT_MENU = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
BLOCK32_MENU = ("Q4_0", "Q5_0", "Q8_0")
BLOCK32 = {"Q4_0": (4, 18), "Q5_0": (5, 22), "Q8_0": (8, 34)}  # symmetric groups of 32: (bits, block bytes)


def menu(cols: int) -> tuple[str, ...]:
    """The GGUF types a linear with `cols` inputs can take (empty when none can)."""
    if cols % kquant.QK == 0:
        return KQUANT_MENU
    return BLOCK32_MENU if cols % 32 == 0 else ()


def type_bits(t: str, rows: int, cols: int) -> int:
    """Exact stored bits of a rows x cols linear in type t (the artifact's and the GGUF file's)."""
    if t in kquant.TYPES:
        return 8 * rows * (cols // kquant.QK) * kquant.TYPES[t].block_bytes
    return 8 * rows * (cols // 32) * BLOCK32[t][1]


def type_config(cfg: CompressConfig, t: str) -> CompressConfig:
    """The gptq / rtn settings that solve a layer in type t (a k-quant grid, or symmetric groups of 32)."""
    base = dict(method=cfg.cvxq_solver, target_bits=None, target_size=None, target_size_total=None)
    if t in kquant.TYPES:
        return dataclasses.replace(cfg, **base, grid=f"gguf:{t}")
    return dataclasses.replace(cfg, **base, grid="affine", bits=BLOCK32[t][0], group_size=32, symmetric=True, scale_bits=10)


def layer_costs(W: torch.Tensor, sens: torch.Tensor, cfg: CompressConfig, name: str
                ) -> tuple[tuple[str, ...], torch.Tensor, torch.Tensor]:
    """(menu, distortion [types], rate in bits [types]) of one linear W [out, in] with sensitivities `sens`
    ([out, in] or [in]): the allocation keeps only these, so a streamed run drops the weights after."""
    from .rtn import rtn_quantize

    rows, cols = W.shape
    types = menu(cols)
    if not types:
        raise RdquantError(f"{name}: its {cols} input columns are not a multiple of 32, so no GGUF type holds it; "
                           "compress without --grid gguf")
    W = W.to(torch.float32)
    s = sens.to(W.device, torch.float32)
    D = []
    for t in types:
        Q = rtn_quantize(W, type_config(dataclasses.replace(cfg, cvxq_solver="rtn"), t)).dequantize()
        D.append(float(((W - Q).square() * s).sum(dtype=torch.float64)))
    R = [type_bits(t, rows, cols) for t in types]
    return types, torch.tensor(D, dtype=torch.float64), torch.tensor(R, dtype=torch.float64)


def allocate(costs: dict[str, tuple[tuple[str, ...], torch.Tensor, torch.Tensor]], budget: float) -> tuple[dict[str, str], int]:
    """One type per layer, least total distortion with total bits <= budget: (types, their bits). An impossible
    budget (below every layer's smallest type) is a one-line error."""
    names = list(costs)
    smallest = sum(float(costs[n][2].min()) for n in names)
    if budget < smallest:
        raise RdquantError(f"the target ({budget / 8:,.0f} bytes of linears) is below the smallest GGUF mix "
                           f"({smallest / 8:,.0f} bytes: every layer at its narrowest type); raise the target")

    def pick(lam: float) -> list[int]:
        return [int(torch.argmin(costs[n][1] + lam * costs[n][2])) for n in names]

    def bits(choice: list[int]) -> float:
        return sum(float(costs[n][2][k]) for n, k in zip(names, choice))

    lo, hi = 0.0, 1.0
    while bits(pick(hi)) > budget:  # a multiplier large enough to fit
        hi *= 4
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if bits(pick(mid)) <= budget else (mid, hi)
    choice = pick(hi)
    left = budget - bits(choice)
    while True:  # spend what is left on the upgrade with the most distortion saved per bit
        best, gain = None, 0.0
        for i, n in enumerate(names):
            _, D, R = costs[n]
            for k in range(len(R)):
                dr = float(R[k] - R[choice[i]])
                dd = float(D[choice[i]] - D[k])
                if 0 < dr <= left and dd > 0 and dd / dr > gain:
                    best, gain = (i, k, dr), dd / dr
        if best is None:
            break
        i, k, dr = best
        choice[i], left = k, left - dr
    return {n: costs[n][0][k] for n, k in zip(names, choice)}, int(bits(choice))


def quantize(W: torch.Tensor, H: torch.Tensor, cfg: CompressConfig, types: list[str],
             parts: tuple[tuple[int, bool], ...]) -> tuple[list, list[str]]:
    """The stacked layers (rows `parts`) each solved in its own type with the shared Hessian (GPTQ's rows are
    independent given H, so solving the parts apart is the stacked solve)."""
    from .gptq import gptq_quantize
    from .rtn import rtn_quantize

    out, notes, r0 = [], [], 0
    for (rows, _), t in zip(parts, types):
        Wp = W[r0 : r0 + rows]
        c = type_config(cfg, t)
        if c.method == "gptq":
            q, n = gptq_quantize(Wp, H, c)
        else:
            q, n = rtn_quantize(Wp, c, torch.diagonal(H).clone() if H is not None else None), []
        out.append(q)
        notes += n
        r0 += rows
    return out, notes
