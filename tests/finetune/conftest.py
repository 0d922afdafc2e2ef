"""Finetune fixtures: a small synthetic dataset and a FakeEngine with canned outputs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from service.engines.protocol import Generation, GenerationRequest


@pytest.fixture(scope="session")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 synthetic shape images (seed 5): annotations.json, vqa.jsonl, images/."""
    from finetune.data.synth import generate

    return generate(tmp_path_factory.mktemp("shapes"), 12, seed=5)


class FakeEngine:
    """An :class:`service.engines.protocol.Engine` that answers from ``reply(request) -> text`` (tokenized for real)."""

    name = "fake"
    model_name = "fake-model"

    def __init__(self, tokenizer: Any, reply: Callable[[GenerationRequest], str]) -> None:
        self._tokenizer, self._reply, self.requests = tokenizer, reply, []  # type: ignore[var-annotated]

    async def generate(self, request: GenerationRequest) -> Generation:
        self.requests.append(request)
        text = self._reply(request)
        ids = tuple(self._tokenizer(text, add_special_tokens=False)["input_ids"])
        return Generation(token_ids=ids, text=text, logprobs=tuple(-0.1 for _ in ids), finish_reason="stop")

    async def check_health(self) -> None:
        return None

    def tokenizer(self) -> object:
        return self._tokenizer

    def stats(self) -> dict[str, float]:
        return {"queue_depth": 0.0, "in_flight": 0.0}

    async def aclose(self) -> None:
        return None
