"""Perplexity, the standard protocol: the text tokenized once, non-overlapping windows of `seqlen`
tokens, ppl = exp(mean next-token NLL). One code path for original and compressed models."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .artifact import is_artifact
from .data import check_seqlen, eval_text, eval_windows
from .errors import RdquantError
from .memory import retain_freed_memory


@dataclass
class EvalResult:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # tokens in the scored windows (windows * seqlen)
    predicted: int  # tokens whose likelihood was scored (windows * (seqlen - 1))
    windows: int
    seqlen: int
    data: str
    seconds: float


def load_any(model: str, device: str = "cpu", dtype: torch.dtype = torch.float32, backend: str = "auto",
             max_memory: str | int | None = None):
    """(model, tokenizer) for an artifact directory, an alias, a .gguf file or an HF directory. An
    artifact's layers take `backend` (backends.py; `auto`: a kernel where one runs here, else cached
    dequantized weights where memory allows: 4-bit default model on 2 CPU cores ~32 tokens/s cached
    against ~6 dequantizing on every call). `max_memory` streams an artifact's blocks beyond it (stream.py)."""
    if is_artifact(model):
        from .loading import load, load_tokenizer

        return load(model, device=device, dtype=dtype, backend=backend, max_memory=max_memory), load_tokenizer(model)
    if max_memory is not None:
        from .stream import not_streamable

        raise not_streamable(model)
    from .models import load_model

    m, tok, _ = load_model(model, dtype=dtype, device=device)
    return m, tok


# config keys of forwards that transform the head's output (a scale is the identity at 1, a cap never is)
_LOGIT_SCALES = ("logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier")
_LOGIT_CAPS = ("final_logit_softcapping", "logits_soft_cap")
PROBE_TOKENS = 16  # positions on which head(decoder) is checked against the model's own forward


def _transforms_logits(config: Any) -> bool:
    """Whether `config` (or its text config, where multimodal models keep these keys) names a logit
    scale other than 1 or any logit soft cap."""
    text = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else None
    for c in (config, text):
        if any(getattr(c, k, None) not in (None, 1, 1.0) for k in _LOGIT_SCALES):
            return True
        if any(getattr(c, k, None) is not None for k in _LOGIT_CAPS):
            return True
    return False


def _decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(decoder giving last_hidden_state, output head) when the structure and config allow
    logits = head(hidden), else None."""
    if _transforms_logits(getattr(model, "config", None)):
        return None
    get_decoder, get_head = getattr(model, "get_decoder", None), getattr(model, "get_output_embeddings", None)
    try:
        decoder = get_decoder() if callable(get_decoder) else None
    except (AttributeError, NotImplementedError, ValueError):
        return None
    head = get_head() if callable(get_head) else None
    if decoder is None or head is None or decoder is model:
        return None
    return decoder, head


def _hidden(decoder: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The decoder's final hidden states [1, L, hidden] for x [1, L], or None if it gives none."""
    return getattr(decoder(input_ids=x, use_cache=False), "last_hidden_state", None)


def loss_parts(model: nn.Module, probe: torch.Tensor) -> tuple[nn.Module, nn.Module] | None:
    """(decoder, head) when the model's logits are head(decoder hidden states): the structure and config
    say so and, on `probe` [1, n] (a few tokens), they equal the forward's. None: take whole logits
    (a forward may scale, cap or bias its logits in ways no config key names, e.g. Falcon-H1)."""
    parts = _decoder_and_head(model)
    if parts is None:
        return None
    decoder, head = parts
    hidden = _hidden(decoder, probe)
    if hidden is None:
        return None
    split, full = head(hidden).float(), model(probe, use_cache=False).logits.float()
    atol = 1e-5 * float(full.abs().max())
    return parts if split.shape == full.shape and torch.allclose(split, full, rtol=1e-4, atol=atol) else None


def window_nll(model: nn.Module, x: torch.Tensor, parts: tuple[nn.Module, nn.Module] | None,
               chunk: int = 256) -> float:
    """Summed next-token NLL of one window x [1, L]. With `parts` (loss_parts): the decoder's hidden
    states once, then head and cross-entropy on `chunk` positions at a time, so the [L, vocab] fp32
    logits are never built; without: the forward's whole logits."""
    if parts is None:
        logits = model(x, use_cache=False).logits[0, :-1].float()
        return float(F.cross_entropy(logits, x[0, 1:], reduction="sum"))
    decoder, head = parts
    hidden = _hidden(decoder, x)[0, :-1]
    total = 0.0
    for s in range(0, hidden.shape[0], chunk):
        logits = head(hidden[s : s + chunk]).float()
        total += float(F.cross_entropy(logits, x[0, 1 + s : 1 + s + chunk], reduction="sum"))
    return total


@torch.inference_mode()
def evaluate(
    model: nn.Module | str | Any,
    tokenizer: Any = None,
    data: str = "wikitext2",
    seqlen: int = 2048,
    max_windows: int | None = None,
    device: str = "cpu",
    progress: bool = True,
    chunk: int = 256,
    max_memory: str | int | None = None,
) -> EvalResult:
    """Perplexity of `model` (a module, a CompressedModel, or a path/alias) on `data`. Where the logits
    are head(decoder) (`loss_parts`), the loss is taken `chunk` positions at a time, so memory does
    not grow with the vocabulary; other models give their whole logits (`window_nll`). A path loaded
    here takes `max_memory` (an artifact's blocks beyond it are streamed: stream.py)."""
    if isinstance(model, str):
        model, tokenizer = load_any(model, device=device, max_memory=max_memory)
    elif max_memory is not None:
        raise RdquantError("max_memory applies when evaluate loads the model: pass a path, or load it with "
                           "rdquant.load(path, max_memory=...)")
    elif hasattr(model, "model") and hasattr(model, "tokenizer") and not isinstance(model, nn.Module):
        model, tokenizer = model.model, tokenizer or model.tokenizer
    if tokenizer is None:
        raise RdquantError("evaluate needs a tokenizer for an in-memory model")
    if max_windows is not None and max_windows < 1:
        raise RdquantError(f"max_windows must be at least 1 (got {max_windows})")
    if chunk < 1:
        raise RdquantError(f"chunk must be at least 1 (got {chunk})")
    check_seqlen(model, seqlen, "seqlen")
    windows = eval_windows(tokenizer, eval_text(data), seqlen)  # a BOS first in each where the tokenizer adds one
    n = windows.shape[0]
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise RdquantError(f"{data} has fewer tokens than one window of {seqlen}")
    model.eval()
    dev = next(model.parameters()).device
    t0 = time.perf_counter()
    total = 0.0
    model(windows[0, :1].unsqueeze(0).to(dev))  # models that prepare on their first call (a compressed-tensors
    # model decompresses then) are ready before loss_parts calls their parts directly
    parts = loss_parts(model, windows[0, : min(PROBE_TOKENS, seqlen)].unsqueeze(0).to(dev))
    from .kvcache import has_kv, past_only

    # a quantized KV cache: each position sees the quantized past and itself exact, as generation would
    with retain_freed_memory(), (past_only(model) if has_kv(model) else contextlib.nullcontext()):
        for w in tqdm(range(n), desc=f"ppl {data}", unit="window", disable=not progress):
            x = windows[w].unsqueeze(0).to(dev)
            total += window_nll(model, x, parts, chunk)
    predicted = n * (seqlen - 1)
    nll = total / predicted
    return EvalResult(math.exp(nll), nll, n * seqlen, predicted, n, seqlen, data, time.perf_counter() - t0)
