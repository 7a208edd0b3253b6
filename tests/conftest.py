"""Shared fixtures: tiny random models of two transformers families, with a real (small) tokenizer."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Triton picks its CPU interpreter when it is first imported, and other packages the tests use
# (compressed-tensors, transformers' integrations) may import it first: choose it before any of them.
# The kernel tests run under it; `auto` still takes Triton kernels on CUDA devices only.
if "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
