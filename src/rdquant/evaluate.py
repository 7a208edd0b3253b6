"""Perplexity, the standard protocol: the text tokenized once, non-overlapping windows of `seqlen`
tokens, ppl = exp(mean next-token NLL). One code path for original and compressed models."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .artifact import is_artifact
from .data import eval_text
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


def load_any(model: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for an artifact directory, an alias, a .gguf file or an HF directory."""
    if is_artifact(model):
        from .loading import load, load_tokenizer

        return load(model, device=device, dtype=dtype, cache_dequantized=True), load_tokenizer(model)
    from .models import load_model

    m, tok, _ = load_model(model, dtype=dtype, device=device)
    return m, tok


@torch.inference_mode()
def evaluate(
    model: nn.Module | str | Any,
    tokenizer: Any = None,
    data: str = "wikitext2",
    seqlen: int = 2048,
    max_windows: int | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> EvalResult:
    """Perplexity of `model` (a module, a CompressedModel, or a path/alias) on `data`."""
    if isinstance(model, str):
        model, tokenizer = load_any(model, device=device)
    elif hasattr(model, "model") and hasattr(model, "tokenizer") and not isinstance(model, nn.Module):
        model, tokenizer = model.model, tokenizer or model.tokenizer
    if tokenizer is None:
        raise RdquantError("evaluate needs a tokenizer for an in-memory model")
    if seqlen < 2:
        raise RdquantError("seqlen must be at least 2")
    text = eval_text(data)
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise RdquantError(f"{data} has {ids.numel()} tokens, fewer than one window of {seqlen}")
    model.eval()
    dev = next(model.parameters()).device
    t0 = time.perf_counter()
    total = 0.0
    with retain_freed_memory():
        for w in tqdm(range(n), desc=f"ppl {data}", unit="window", disable=not progress):
            x = ids[w * seqlen : (w + 1) * seqlen].unsqueeze(0).to(dev)
            logits = model(x, use_cache=False).logits[0, :-1].float()
            total += float(F.cross_entropy(logits, x[0, 1:], reduction="sum"))
    predicted = n * (seqlen - 1)
    nll = total / predicted
    return EvalResult(math.exp(nll), nll, n * seqlen, predicted, n, seqlen, data, time.perf_counter() - t0)
