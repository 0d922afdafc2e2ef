"""Picks and opens the engine named in the settings: the one place that knows which engines exist."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from service.engine import Engine
from service.settings import Settings


class EngineNotAvailableError(RuntimeError):
    """The requested engine cannot run in this installation."""


def open_engine(
    settings: Settings, *, on_batch: Callable[[int], None] | None = None
) -> AbstractAsyncContextManager[Engine]:
    """The engine for ``settings.engine``, as an async context manager that loads it and closes it.

    ``on_batch`` receives the size of each batch a batching engine runs (the batch-size histogram).
    """
    kind = settings.engine
    if kind == "vllm":
        # vLLM engine (issue 4): return service.vllm_engine.open_vllm_engine(settings) here, and let
        # "auto" prefer it when vLLM imports and a GPU is present.
        raise EngineNotAvailableError("vLLM engine not available yet: use --engine transformers")
    if kind in ("auto", "transformers"):
        from service.hf_engine import open_hf_engine

        return open_hf_engine(settings, on_batch=on_batch)
    raise EngineNotAvailableError(f"unknown engine {kind!r}")
