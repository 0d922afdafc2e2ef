"""Transformers engine: ``PaliGemmaForConditionalGeneration`` with dynamic batching.

transformers has no continuous batching, so concurrent requests are grouped: the worker waits until the
oldest queued request is ``batch_window`` old or ``max_batch_size`` requests are queued, then pads them
(left, as decoder-only generation needs) into one greedy ``generate`` call in a single worker thread, so
model work never runs on the event loop. While a batch runs, new requests queue up and form the next batch.

Cancelling a queued request removes it; a request whose batch is already running cannot be stopped
mid-``generate`` (transformers has no per-row abort) — its result is discarded when the batch ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from paligemma.grammar import DetectionGrammar
from paligemma.tokens import IMAGE_TOKEN
from service.engines.cpu_threads import cpu_budget, lower_this_thread, torch_threads
from service.engines.hf_model import load_model
from service.engines.protocol import (
    EngineDeadError,
    EngineError,
    EngineOverloadedError,
    Generation,
    GenerationRequest,
    UnknownAdapterError,
    warm_up_request,
)

if TYPE_CHECKING:
    import torch

    from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    request: GenerationRequest
    future: asyncio.Future[Generation]
    arrived: float = field(default=0.0)


class _GreedySteps:
    """Logits processor, last in the list: applies each row's detection grammar and records, per step, the
    log-probability of the token greedy search then takes.

    The recorded value is the *raw* one (the model's own distribution, before the grammar masks it), as
    vLLM reports it (``logprobs_mode="raw_logprobs"``), so scores mean the same on both engines. Storing one
    float per row and step avoids keeping the full ``[batch, steps, vocab]`` logits (0.5 GB at batch 16 on a
    257k vocab). Rows without a grammar, and rows whose answer is complete, are left alone.
    """

    def __init__(self, requests: list[GenerationRequest]) -> None:
        self.steps: list[torch.Tensor] = []
        self._grammars = [DetectionGrammar(r.grammar) if r.grammar is not None else None for r in requests]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        values = scores.float()
        raw = values - values.logsumexp(dim=-1, keepdim=True)
        for row, grammar in enumerate(self._grammars):
            if grammar is None or grammar.done:
                continue
            if self.steps:  # the token chosen at the previous step
                grammar.advance(int(input_ids[row, -1]))
            if grammar.done:
                continue
            scores[row] = grammar.mask(scores[row])
        chosen = scores.argmax(dim=-1, keepdim=True)
        self.steps.append(raw.gather(1, chosen)[:, 0])
        return scores


class HFEngine:
    """The :class:`service.engines.protocol.Engine` over transformers; build it with :func:`open_hf_engine`."""

    name = "transformers"

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        model_name: str,
        max_batch_size: int = 8,
        batch_window_s: float = 0.005,
        max_queue_size: int = 256,
        on_batch: Callable[[int], None] | None = None,
        model_nice: int = 0,
    ) -> None:
        self.model_name = model_name
        self._model = model
        self._processor = processor
        self._tokenizer = processor.tokenizer
        self._tokenizer.padding_side = "left"
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = self._tokenizer.eos_token_id
        self._eos_ids: set[int] = set(eos) if isinstance(eos, list) else {int(eos)}
        self._pad_id = int(self._tokenizer.pad_token_id or 0)
        self._max_batch = max_batch_size
        self._window = batch_window_s
        self._max_queue = max_queue_size
        self._on_batch = on_batch
        self._queue: deque[_Pending] = deque()
        self._running: list[_Pending] = []
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(  # the model's thread, below the event loop (cpu_threads.py)
            max_workers=1, thread_name_prefix="hf-generate", initializer=lower_this_thread, initargs=(model_nice,)
        )
        self._worker: asyncio.Task[None] | None = None
        self._closed = False
        self._generate_calls = 0

    def start(self) -> None:
        """Start the batching worker on the running loop."""
        self._worker = asyncio.get_running_loop().create_task(self._work(), name="hf-engine-worker")

    async def generate(self, request: GenerationRequest) -> Generation:
        """Queue one request and wait for the batch it joins."""
        if self._closed or self._worker is None or self._worker.done():
            raise EngineDeadError("the transformers engine is not running")
        if request.adapter is not None:
            raise UnknownAdapterError(f"unknown adapter {request.adapter!r}: this engine serves the base model only")
        if len(self._queue) >= self._max_queue:
            raise EngineOverloadedError("the engine queue is full")
        loop = asyncio.get_running_loop()
        item = _Pending(request, loop.create_future(), loop.time())
        self._queue.append(item)
        self._wakeup.set()
        try:
            return await item.future
        except asyncio.CancelledError:
            with contextlib.suppress(ValueError):
                self._queue.remove(item)
            raise

    async def check_health(self) -> None:
        if self._closed or self._worker is None or self._worker.done():
            raise EngineDeadError("the transformers engine is not running")

    def tokenizer(self) -> object:
        return self._tokenizer

    def stats(self) -> dict[str, float]:
        return {
            "queue_depth": float(len(self._queue)),
            "in_flight": float(len(self._running)),
            "generate_calls": float(self._generate_calls),
        }

    async def aclose(self) -> None:
        """Stop the worker (which fails whatever still waits), wait for the running batch, free the model."""
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown, True)
        self._model = None

    async def _next_batch(self) -> list[_Pending]:
        """Wait for work, then until the oldest request is ``window`` old or the batch is full."""
        loop = asyncio.get_running_loop()
        while not self._queue:
            self._wakeup.clear()
            await self._wakeup.wait()
        deadline = self._queue[0].arrived + self._window
        while self._queue and len(self._queue) < self._max_batch and (remaining := deadline - loop.time()) > 0:
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), remaining)
        batch = [self._queue.popleft() for _ in range(min(len(self._queue), self._max_batch))]
        return [item for item in batch if not item.future.done()]

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while not self._closed:
                self._running = await self._next_batch()
                if not self._running:
                    continue
                requests = [item.request for item in self._running]
                results = await loop.run_in_executor(self._executor, self._generate_rows, requests)
                for item, result in zip(self._running, results, strict=True):
                    if item.future.done():
                        continue
                    if isinstance(result, Generation):
                        item.future.set_result(result)
                    else:
                        item.future.set_exception(result)
                self._running = []
        except Exception:
            log.exception("the transformers engine worker died")
            raise
        finally:  # whatever ends the worker, nobody may wait forever
            for item in [*self._queue, *self._running]:
                if not item.future.done():
                    item.future.set_exception(EngineDeadError("the engine stopped"))
            self._queue.clear()
            self._running = []

    def _generate_rows(self, requests: list[GenerationRequest]) -> list[Generation | EngineError]:
        """One padded ``generate``; if it fails, each request alone, so one bad input fails only itself."""
        try:
            return list(self._generate_batch(requests))
        except Exception:
            log.exception("generate failed for a batch of %d", len(requests))
            if len(requests) == 1:
                return [EngineError("generation failed")]
        out: list[Generation | EngineError] = []
        for request in requests:
            out.extend(self._generate_rows([request]))
        return out

    async def warm_up(self) -> float:
        """Run :func:`~service.engines.protocol.warm_up_request` on the model thread (not counted in the stats);
        returns its seconds."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        await loop.run_in_executor(self._executor, partial(self._generate_batch, [warm_up_request()], record=False))
        return loop.time() - start

    def _generate_batch(self, requests: list[GenerationRequest], record: bool = True) -> list[Generation]:
        import torch
        from transformers import LogitsProcessorList

        model = self._model
        inputs = self._processor(
            text=[IMAGE_TOKEN + r.prefix for r in requests],
            images=[r.image for r in requests],
            return_tensors="pt",
            padding="longest",
        )
        inputs.pop("labels", None)
        inputs = {k: v.to(model.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        recorder = _GreedySteps(requests)
        with torch.inference_mode():
            out = model.generate(
                **inputs,
                max_new_tokens=max(r.max_new_tokens for r in requests),
                do_sample=False,
                num_beams=1,
                logits_processor=LogitsProcessorList([recorder]),
                return_dict_in_generate=True,
                pad_token_id=self._pad_id,
                eos_token_id=sorted(self._eos_ids),
            )
        if record:
            self._generate_calls += 1
            if self._on_batch is not None:
                self._on_batch(len(requests))
        generated = out.sequences[:, inputs["input_ids"].shape[1] :].cpu().tolist()
        logprobs = torch.stack(recorder.steps, dim=1).cpu().tolist() if recorder.steps else [[]] * len(requests)
        prompt_tokens = inputs["attention_mask"].sum(dim=1).cpu().tolist()
        return [
            self._finish(r, ids, lps, int(n))
            for r, ids, lps, n in zip(requests, generated, logprobs, prompt_tokens, strict=True)
        ]

    def _finish(self, request: GenerationRequest, ids: list[int], logprobs: list[float], prompt: int) -> Generation:
        """Cut a row at its own ``max_new_tokens`` and first eos (rows of a batch share one length)."""
        ids = ids[: request.max_new_tokens]
        stop = next((i for i, t in enumerate(ids) if t in self._eos_ids), None)
        if stop is not None:
            ids = ids[:stop]
        return Generation(
            token_ids=tuple(ids),
            text=self._tokenizer.decode(ids, skip_special_tokens=True),
            logprobs=tuple(logprobs[: len(ids)]),
            finish_reason="stop" if stop is not None else "length",
            prompt_tokens=prompt,
        )


@contextlib.asynccontextmanager
async def open_hf_engine(settings: Settings, on_batch: Callable[[int], None] | None = None) -> AsyncIterator[HFEngine]:
    """Load the model off the event loop, start the batching worker, and close it on exit."""
    budget = cpu_budget(settings)
    log.info("%s", budget.describe())
    with torch_threads(budget.model_threads):
        async with _open_hf_engine(settings, on_batch) as engine:
            yield engine


@contextlib.asynccontextmanager
async def _open_hf_engine(settings: Settings, on_batch: Callable[[int], None] | None) -> AsyncIterator[HFEngine]:
    model, processor = await asyncio.get_running_loop().run_in_executor(None, load_model, settings)
    engine = HFEngine(
        model,
        processor,
        model_name=settings.served_model_name,
        max_batch_size=settings.max_batch_size,
        batch_window_s=settings.batch_window_ms / 1000,
        max_queue_size=settings.max_queue_size,
        on_batch=on_batch,
        model_nice=settings.model_nice if model.device.type == "cpu" else 0,
    )
    engine.start()
    try:
        seconds = await engine.warm_up()
        log.info("warm-up generation: %.2f s (weights read, kernels run): ready", seconds)
        yield engine
    finally:
        await engine.aclose()
