"""The one door to the model: the ``Engine`` protocol that the HTTP layer and the evaluator talk to.

Engines (``service.engines.hf_engine`` for transformers, ``service.engines.vllm_engine`` for vLLM) take a
task prefix and an image and return generated token ids with per-token logprobs. They know nothing about HTTP, boxes or
JSON; the format layer (``paligemma``) turns ids into detections.

Cancelling the task that awaits :meth:`Engine.generate` must abort the request inside the engine (client
disconnects and deadlines rely on it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    from PIL.Image import Image

    from paligemma.grammar import GrammarSpec

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class GenerationRequest:
    """One image and one task prefix (``"detect cat ; dog"``), without ``<image>``, ``<bos>`` or ``"\\n"``."""

    image: Image
    prefix: str
    max_new_tokens: int = 64
    adapter: str | None = None
    """Name of a LoRA adapter the engine was started with; None = the base model."""
    request_id: str = ""
    grammar: GrammarSpec | None = None
    """Constrain the answer to this detection grammar (``paligemma.grammar``); None = unconstrained."""
    image_id: str | None = None
    """A digest of the uploaded bytes, which name the image exactly: engines may key image caches by it."""


@dataclass(frozen=True)
class Generation:
    """What the model produced for one request."""

    token_ids: tuple[int, ...]
    """Generated ids, without the prompt and without the final eos."""
    text: str
    """Decoded ``token_ids`` with loc/seg tokens kept (``skip_special_tokens`` semantics of the engine)."""
    logprobs: tuple[float, ...]
    """Log-probability of each chosen token, aligned with ``token_ids``."""
    finish_reason: FinishReason
    prompt_tokens: int = 0
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


WARM_UP_PREFIX = "caption en"


def warm_up_request() -> GenerationRequest:
    """The generation each engine runs before it reports ready (a grey image, two tokens): it reads every
    weight (a memory-mapped checkpoint is otherwise read from disk by the first user's request) and runs each
    kernel once, so ``/readyz`` turns 200 only when a request would be served at full speed."""
    from PIL import Image

    return GenerationRequest(Image.new("RGB", (64, 64), (128, 128, 128)), WARM_UP_PREFIX, max_new_tokens=2)


class EngineError(RuntimeError):
    """The engine failed on one request; the engine itself is still usable."""


class EngineOverloadedError(EngineError):
    """The engine's queue is full; the request was not started and may be retried later (HTTP 503)."""


class EngineDeadError(RuntimeError):
    """The engine cannot serve any more requests; the process should exit so it can be restarted."""


class UnknownAdapterError(ValueError):
    """The request names a LoRA adapter the engine was not started with."""


@runtime_checkable
class Engine(Protocol):
    """Async interface every engine implements."""

    name: str
    """Engine kind, e.g. ``"transformers"`` or ``"vllm"``."""
    model_name: str
    """What the model is called in responses and metrics."""

    async def generate(self, request: GenerationRequest) -> Generation:
        """Greedy generation for one request; concurrent calls are batched by the engine."""
        ...

    async def check_health(self) -> None:
        """Raise :class:`EngineDeadError` if the engine can no longer serve."""
        ...

    def tokenizer(self) -> object:
        """The Hugging Face tokenizer (for :class:`paligemma.SpecialIds` and decoding label runs)."""
        ...

    def stats(self) -> dict[str, float]:
        """Current ``queue_depth`` and ``in_flight``; batching engines add a ``generate_calls`` counter."""
        ...

    async def aclose(self) -> None:
        """Release the model and any worker threads or processes."""
        ...
