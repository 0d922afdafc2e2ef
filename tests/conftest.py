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
def shapes_checkpoint() -> Path:
    """The tiny shape trained ~20 s on synthetic shapes (tests/shapes_model.py, cached): emits real boxes."""
    from tests.shapes_model import cached_shapes_model

    return cached_shapes_model()
