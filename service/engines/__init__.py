"""Engines: one small protocol (:mod:`.protocol`) and the two engines that implement it.

``transformers`` (:mod:`.hf_engine`, dynamic batching, the reference) and ``vllm`` (:mod:`.vllm_engine`,
in-process ``AsyncLLM``; :mod:`.vllm_plugin` is loaded by vLLM itself). :func:`open_engine` picks one from
the settings. The HTTP app and the finetune evaluator both talk to engines through this package; it
imports nothing from the HTTP side (format layer -> engines -> app).
"""

from service.engines.factory import EngineNotAvailableError, choose_engine, open_engine
from service.engines.protocol import (
    Engine,
    EngineDeadError,
    EngineError,
    EngineOverloadedError,
    Generation,
    GenerationRequest,
    UnknownAdapterError,
)

__all__ = [
    "Engine",
    "EngineDeadError",
    "EngineError",
    "EngineNotAvailableError",
    "EngineOverloadedError",
    "Generation",
    "GenerationRequest",
    "UnknownAdapterError",
    "choose_engine",
    "open_engine",
]
