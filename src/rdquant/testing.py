"""Tiny random models with a real (small) tokenizer, for tests and smoke runs: no download needed."""

from __future__ import annotations

import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .data import read_documents


def tiny_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer trained in a second on the bundled C4 sample."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<eos>"], show_progress=False)
    tok.train_from_iterator(read_documents(None)[:100], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def tiny_model(family: str, vocab_size: int, hidden: int = 64, intermediate: int = 160, layers: int = 3, seed: int = 0,
               tie_word_embeddings: bool = False):
    """A randomly initialised causal LM of a transformers family ('llama' or 'qwen2')."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=1024, tie_word_embeddings=tie_word_embeddings)
    cfg = {"llama": LlamaConfig, "qwen2": Qwen2Config}[family](**common)
    return AutoModelForCausalLM.from_config(cfg).eval()


def save_tiny_model_dir(path: Path, family: str = "llama", **kw) -> Path:
    """Write an HF model directory (config, safetensors, tokenizer) of a tiny random model."""
    tok = tiny_tokenizer()
    tiny_model(family, len(tok), **kw).save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)


def _draw_widths(shape: tuple[int, ...], widths: tuple[int, ...], probs: tuple[float, ...] | None,
                 g: torch.Generator, device) -> torch.Tensor:
    p = torch.tensor(probs if probs is not None else [1.0] * len(widths), dtype=torch.float32)
    idx = torch.multinomial(p, int(torch.tensor(shape).prod()), replacement=True, generator=g).reshape(shape)
    return torch.tensor(widths)[idx].to(device)


def random_mixed(out_f: int, in_f: int, widths: tuple[int, ...] = (2, 3, 4), probs: tuple[float, ...] | None = (1, 2, 1),
                 cluster_rows: int = 128, seed: int = 0, device: str | torch.device = "cpu"):
    """A MixedWeight of row-cluster x column cells (CVXQ's default cells) with random codes: rows
    scattered into clusters of `cluster_rows` (the last one smaller), cell widths drawn from `widths`
    with weights `probs`, width-0 cells with their centre as scale. For kernel tests and speed runs."""
    from .qmixed import MixedWeight

    g = torch.Generator().manual_seed(seed)
    n_clusters = -(-out_f // cluster_rows)
    clusters = (torch.randperm(out_f, generator=g) // cluster_rows).to(torch.int16)
    w = _draw_widths((n_clusters, in_f), widths, probs, g, "cpu")
    codes = (torch.rand(out_f, in_f, generator=g) * (1 << w[clusters.long()])).floor().to(torch.uint8)
    zeros = torch.where(w == 0, -1.0, (torch.rand(n_clusters, in_f, generator=g) * (1 << w)).floor())
    # weights of a trained model's size (|W| ~ 0.02): the wider the cell, the finer its step
    scales = ((torch.rand(n_clusters, in_f, generator=g) * 0.5 + 0.75) * 0.05 / (1 << w)).half()
    mw = MixedWeight(codes, w.to(torch.uint8), scales, zeros, cluster_rows, 4, clusters)
    return MixedWeight(*(t.to(device) if isinstance(t, torch.Tensor) else t for t in
                         (mw.codes, mw.widths, mw.scales, mw.zeros, mw.group_size, mw.wbits, mw.clusters)))


def random_codebook(out_f: int, in_f: int, widths: tuple[int, ...] = (2, 3, 4), probs: tuple[float, ...] | None = (1, 7, 2),
                    share: int = 1, entry_bits: int = 8, row_scale: bool = True, outliers: int = 0, seed: int = 0,
                    device: str | torch.device = "cpu"):
    """A CodebookWeight (CLAQ's layout) with random codes and sorted random codebooks: codebook widths
    drawn from `widths` with weights `probs`, 8-bit entries on a per-codebook range or fp16 entries,
    per-row scales, `outliers` fp16 entries at random places. For kernel tests and speed runs."""
    from .qcodebook import CodebookWeight, column_widths, compact_codebooks, entries_of

    g = torch.Generator().manual_seed(seed)
    n_cb = -(-in_f // share)
    w = _draw_widths((n_cb,), widths, probs, g, "cpu")
    cw = column_widths(w, share, in_f)
    codes = (torch.rand(out_f, in_f, generator=g) * (1 << cw)[None, :]).floor().to(torch.uint8)
    kmax = 1 << int(w.max())
    books = torch.full((n_cb, kmax), float("inf"))
    slot = torch.arange(kmax)[None, :]
    vals = torch.randn(n_cb, kmax, generator=g).sort(1).values * 0.02
    books = torch.where(slot < (1 << w)[:, None], vals, books)
    valid = torch.isfinite(books)
    if entry_bits == 16:
        book, rng = books[valid].half(), None
    else:
        _, lo, step = compact_codebooks(books)
        book, rng = entries_of(books, lo, step)[valid], torch.stack([lo, step], 1)
    kw = {}
    if outliers:
        flat = torch.randperm(out_f * in_f, generator=g)[:outliers]
        r, c = flat // in_f, flat % in_f
        key = torch.argsort(c * out_f + r)  # sorted by (column, row)
        kw = dict(outlier_count=torch.bincount(c[key], minlength=in_f).to(torch.int16),
                  outlier_row=r[key].to(torch.int16), outlier_val=(torch.randn(outliers, generator=g) * 0.1).half())
    rs = (torch.rand(out_f, 1, generator=g) + 0.5).half() if row_scale else None
    cb = CodebookWeight(codes, w.to(torch.uint8), book, share, row_scale=rs, codebook_range=rng, **kw)
    moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(cb).items()}
    return CodebookWeight(**moved)


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensors alive at once inside `with LiveBytes() as m:` (m.peak), on any device: every
    storage an operator returns counts from then until it is freed (tensors made before the block count from
    their first use in it). Measures a step's memory without a GPU (bench/solve_memory.py, tests)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def _count(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key, n = st.data_ptr(), st.nbytes()
        if n == 0 or key in self._seen:
            return
        self._seen.add(key)
        self.live += n
        self.peak = max(self.peak, self.live)

        def gone(key: int = key, n: int = n) -> None:
            self._seen.discard(key)
            self.live -= n

        weakref.finalize(st, gone)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._count(t)
        return out
