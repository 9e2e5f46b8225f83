"""Shared test set-up: offline, a per-session vlsafe cache, few threads."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `make test` runs pytest-xdist workers side by side: each gets its share of the cores (set before torch is
# imported, and inherited by the commands tests start), so two workers do not oversubscribe two cores
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct as an HF dir, dequantised once into the vlsafe cache (VLSAFE_CACHE or ~/.cache/vlsafe)."""
    from vlsafe.model import gguf

    return gguf.llm_dir("smollm2-135m-instruct")
