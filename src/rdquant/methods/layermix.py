"""CVXQ's allocation with one choice per linear from a menu, for files other tools load: `--grid gguf` (one llama.cpp
type per linear: a size-targeted GGUF mix) or `--cells layer` (one affine width per linear at --group-size, each
width a compressed-tensors config group). Each layer's distortion at each choice is measured, not modelled:
D_l(t) = sum over its weights of G^2 (W - Q_t(W))^2, Q_t plain rounding in choice t's grid and G^2 CVXQ's
sensitivity; its rate is the choice's exact stored bits. One multiplier lambda picks every layer's choice,
t_l = argmin_t D_l(t) + lambda R_l(t), found by bisection so the linears fit the budget, then the budget left is
spent on the upgrades that buy the most distortion per bit. Each layer is then solved by GPTQ (or RTN) in its
choice's grid, so the export holds the artifact exactly. With `--cells layer` the linears vLLM fuses (q/k/v,
gate/up) share one width.

GGUF menu: rows of whole 256-weight super-blocks take Q2_K, Q3_K, Q4_K, Q5_K, Q6_K or Q8_0; other rows (a multiple
of 32) the block-32 types Q4_0, Q5_0, Q8_0, as llama.cpp's fallbacks do. Width menu: int2 .. int{--max-bits}.
"""

from __future__ import annotations

import torch

from .. import kquant, packing
from ..config import CompressConfig
from ..errors import RdquantError
from ..qtensor import num_groups

KQUANT_MENU = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
BLOCK32_MENU = ("Q4_0", "Q5_0", "Q8_0")
BLOCK32 = {"Q4_0": (4, 18), "Q5_0": (5, 22), "Q8_0": (8, 34)}  # symmetric groups of 32: (bits, block bytes)
FUSED = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}


def menu(cols: int, cfg: CompressConfig) -> tuple[str, ...]:
    """The choices a linear with `cols` inputs can take (empty when none can)."""
    if cfg.grid != "gguf":
        lo = 2 if cfg.cvxq_min_bits == -1 else max(cfg.cvxq_min_bits, 1)
        return tuple(f"int{b}" for b in range(lo, cfg.cvxq_max_bits + 1))
    if cols % kquant.QK == 0:
        return KQUANT_MENU
    return BLOCK32_MENU if cols % 32 == 0 else ()


def type_bits(t: str, rows: int, cols: int, cfg: CompressConfig | None = None) -> int:
    """Exact stored bits of a rows x cols linear as choice t (the artifact's, and the exported file's)."""
    if t in kquant.TYPES:
        return 8 * rows * (cols // kquant.QK) * kquant.TYPES[t].block_bytes
    if t in BLOCK32:
        return 8 * rows * (cols // 32) * BLOCK32[t][1]
    b, n_g = int(t[3:]), num_groups(cols, cfg.group_size)
    zeros = 0 if cfg.symmetric else packing.packed_nbytes(rows * n_g, b)
    return 8 * (packing.packed_nbytes(rows * cols, b) + 2 * rows * n_g + zeros)


def type_config(cfg: CompressConfig, t: str) -> CompressConfig:
    """The gptq / rtn settings that solve a layer as choice t (a k-quant grid, symmetric groups of 32, or width b)."""
    base = dict(method=cfg.cvxq_solver, target_bits=None, target_size=None, target_size_total=None)
    if t in kquant.TYPES:
        return cfg.replace(**base, grid=f"gguf:{t}")
    if t in BLOCK32:
        return cfg.replace(**base, grid="affine", bits=BLOCK32[t][0], group_size=32, symmetric=True,
                                   scale_bits=10)
    return cfg.replace(**base, bits=int(t[3:]))


def fused_key(name: str, cfg: CompressConfig) -> str:
    """The allocation unit of a linear: with --cells layer, the layer vLLM fuses it into; else itself."""
    pre, _, leaf = name.rpartition(".")
    return f"{pre}.{FUSED[leaf]}" if cfg.grid != "gguf" and leaf in FUSED else name


def layer_costs(W: torch.Tensor, sens: torch.Tensor, cfg: CompressConfig, name: str
                ) -> tuple[tuple[str, ...], torch.Tensor, torch.Tensor]:
    """(menu, distortion [types], rate in bits [types]) of one linear W [out, in] with sensitivities `sens`
    ([out, in] or [in]): the allocation keeps only these, so a streamed run drops the weights after."""
    from .rtn import rtn_quantize

    rows, cols = W.shape
    types = menu(cols, cfg)
    if not types:
        raise RdquantError(f"{name}: its {cols} input columns are not a multiple of 32, so no GGUF type holds it; "
                           "compress without --grid gguf")
    W = W.to(torch.float32)
    s = sens.to(W.device, torch.float32)
    D = []
    for t in types:
        Q = rtn_quantize(W, type_config(cfg.replace(cvxq_solver="rtn"), t)).dequantize()
        D.append(float(((W - Q).square() * s).sum(dtype=torch.float64)))
    R = [type_bits(t, rows, cols, cfg) for t in types]
    return types, torch.tensor(D, dtype=torch.float64), torch.tensor(R, dtype=torch.float64)


def allocate(costs: dict[str, tuple[tuple[str, ...], torch.Tensor, torch.Tensor]], budget: float,
             key=lambda name: name) -> tuple[dict[str, str], int]:
    """One choice per layer, least total distortion with total bits <= budget: (choices, their bits). Layers with
    the same `key` (fused ones) are one unit with one choice. An impossible budget (below every layer's smallest
    choice) is a one-line error."""
    units: dict[str, tuple[tuple[str, ...], torch.Tensor, torch.Tensor]] = {}
    for n, (types, D, R) in costs.items():
        k = key(n)
        units[k] = (types, units[k][1] + D, units[k][2] + R) if k in units else (types, D, R)
    choice, total = _allocate(units, budget)
    return {n: choice[key(n)] for n in costs}, total


def _allocate(costs: dict[str, tuple[tuple[str, ...], torch.Tensor, torch.Tensor]], budget: float) -> tuple[dict[str, str], int]:
    names = list(costs)
    smallest = sum(float(costs[n][2].min()) for n in names)
    if budget < smallest:
        raise RdquantError(f"the target ({budget / 8:,.0f} bytes of linears) is below the smallest mix "
                           f"({smallest / 8:,.0f} bytes: every layer at its narrowest choice); raise the target")

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
