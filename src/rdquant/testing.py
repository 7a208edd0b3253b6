"""Tiny random models with a real (small) tokenizer, for tests and smoke runs: no download needed."""

from __future__ import annotations

from pathlib import Path

import torch

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
