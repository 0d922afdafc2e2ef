"""Shared fixtures: offline mode and tiny real PaliGemma checkpoints built once per session."""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random PaliGemma (transformers' default init): fast, loads in transformers and vLLM."""
    from paligemma.checkpoint import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="session")
def varied_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same shapes with larger random weights, so greedy output varies token to token (parity tests)."""
    from paligemma.checkpoint import TinyConfig, build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("varied"), seed=0, cfg=TinyConfig(init_std=0.3))


@pytest.fixture(scope="session")
def demo_checkpoint() -> Path:
    """The committed demo model (models/demo, tests/demo_model.py): emits real boxes on synthetic shapes."""
    from tests.demo_model import DEMO_MODEL

    if not (DEMO_MODEL / "model.safetensors").is_file():
        pytest.fail(f"{DEMO_MODEL} holds no model.safetensors: it is committed with the repository")
    return DEMO_MODEL
