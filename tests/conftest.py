"""Shared fixtures: tiny random models of two transformers families, with a real (small) tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from rdquant.data import read_documents
from rdquant.testing import save_tiny_model_dir

FAMILIES = ("llama", "qwen2")


@pytest.fixture(scope="session", params=FAMILIES)
def tiny_model_dir(request, tmp_path_factory) -> Path:
    """An HF model directory (config, safetensors, tokenizer) of a tiny random model."""
    return save_tiny_model_dir(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "eval.txt"
    p.write_text("\n\n".join(read_documents(None)[100:130]))
    return p
