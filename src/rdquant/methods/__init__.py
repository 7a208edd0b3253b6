"""Per-matrix quantization methods, one module each, behind one signature:
`quantize(W [out, in], H [in, in] | None, cfg, state, parts, names) -> (weight, notes)`,
where W stacks layers that share the input (and so H); `parts` gives (rows, has_bias) of each and
`names` their full module names. The weight is one weight for the stack (split by rows afterwards)
or a list with one weight per part.

A method may keep run-wide state (ECSQ's rate controller, CVXQ's allocation): `prepare(model,
calib_ids, cfg, progress)` makes it before the first block, and `to_dict` / `from_dict` let
checkpoints carry it across a resume (written once, or with every block's progress when it changes
as the blocks are quantized: `state_changes`).
"""

from __future__ import annotations

from ..errors import RdquantError

from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from ..config import CompressConfig
from ..qtensor import QuantizedWeight
from ..models import block_linears, find_blocks
from .claq import claq_quantize
from .cvxq import CvxqPlan, cvxq_quantize, plan as cvxq_plan
from .ecsq import RateControl, ecsq_quantize, plan_rate
from .gptq import gptq_quantize
from .rtn import rtn_quantize
from .slim import slim_quantize

Result = tuple[QuantizedWeight | list[Any], list[str]]


@dataclass(frozen=True)
class Method:
    name: str
    quantize: Callable[[torch.Tensor, "torch.Tensor | None", CompressConfig, Any], Result]
    needs_hessian: bool
    prepare: Callable[..., Any] | None = None
    from_dict: Callable[[dict[str, Any]], Any] | None = None
    state_changes: bool = False  # the state moves with every block (ECSQ's rate control): saved with each block's progress
    # the solve again after low-rank adapters took their share (W - U D), given the first solve's weights
    # (one per stacked part): SLiM keeps its 2:4 mask; None: `quantize` again
    requantize: Callable[..., Result] | None = None


def state_to_dict(state: Any) -> dict[str, Any] | None:
    if state is None:
        return None
    return state.to_dict() if hasattr(state, "to_dict") else asdict(state)


def _rtn(W, H, cfg, state, parts=None, names=None) -> Result:
    return rtn_quantize(W, cfg), []


def _gptq(W, H, cfg, state, parts=None, names=None) -> Result:
    assert H is not None, "GPTQ needs the layer Hessian"
    return gptq_quantize(W, H, cfg)


def _ecsq(W, H, cfg, state, parts=None, names=None) -> Result:
    assert H is not None and state is not None
    return ecsq_quantize(W, H, cfg, state, len(parts) if parts else 1)


def _ecsq_prepare(source, calib_ids, cfg, progress=True) -> RateControl:
    if source.streamed:
        raise RdquantError("ecsq plans its rate from every weight at once: load the model in memory")
    _, blocks = find_blocks(source.model)
    return plan_rate([lin.weight.data for b in blocks for lin in block_linears(b, cfg.skip).values()], cfg)


def _claq(W, H, cfg, state, parts=None, names=None) -> Result:
    assert H is not None, "CLAQ needs the layer Hessian"
    return claq_quantize(W, H, cfg, parts)


def _cvxq(W, H, cfg, state, parts=None, names=None) -> Result:
    assert state is not None and names is not None
    return cvxq_quantize(W, H, cfg, state, parts, names)


def _slim(W, H, cfg, state, parts=None, names=None) -> Result:
    assert H is not None, "SLiM needs the layer Hessian"
    return slim_quantize(W, H, cfg, parts)


def _slim_again(W, H, cfg, state, parts, names, first) -> Result:
    return slim_quantize(W, H, cfg, parts, mask=torch.cat([f.mask() for f in first]).to(W.device))


def _rate_from_dict(d: dict[str, Any]) -> RateControl:
    return RateControl(**{**d, "history": [tuple(h) for h in d["history"]]})


METHODS: dict[str, Method] = {
    "rtn": Method("rtn", _rtn, needs_hessian=False),
    "gptq": Method("gptq", _gptq, needs_hessian=True),
    "ecsq": Method("ecsq", _ecsq, needs_hessian=True, prepare=_ecsq_prepare, from_dict=_rate_from_dict,
                   state_changes=True),
    "claq": Method("claq", _claq, needs_hessian=True),
    "cvxq": Method("cvxq", _cvxq, needs_hessian=True, prepare=cvxq_plan, from_dict=CvxqPlan.from_dict),
    "slim": Method("slim", _slim, needs_hessian=True, requantize=_slim_again),
}
