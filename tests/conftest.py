"""Shared test set-up: offline, a per-session vlsafe cache, few threads."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct as an HF dir, dequantised once into the vlsafe cache (VLSAFE_CACHE or ~/.cache/vlsafe)."""
    from vlsafe.model import gguf

    return gguf.llm_dir("smollm2-135m-instruct")
