"""Shared fixtures: tiny random models of two transformers families, with a real (small) tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rdquant.data import read_documents

FAMILIES = ("llama", "qwen2")


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<eos>"], show_progress=False)
    tok.train_from_iterator(read_documents(None)[:100], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def make_tiny_model(family: str, vocab: int, seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )
    cfg = LlamaConfig(**common) if family == "llama" else Qwen2Config(**common)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    return model


@pytest.fixture(scope="session", params=FAMILIES)
def tiny_model_dir(request, tiny_tokenizer, tmp_path_factory) -> Path:
    """An HF model directory (config, safetensors, tokenizer) of a tiny random model."""
    d = tmp_path_factory.mktemp(f"tiny-{request.param}")
    model = make_tiny_model(request.param, len(tiny_tokenizer))
    model.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "eval.txt"
    p.write_text("\n\n".join(read_documents(None)[100:130]))
    return p
