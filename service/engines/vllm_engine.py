"""The vLLM engine: in-process ``AsyncLLM`` with continuous batching, per-request LoRA and logprobs.

The only module that imports vLLM (lazily, inside functions). vLLM's EngineCore runs in a separate
process; this process keeps tokenization, image preprocessing, detokenization and vLLM's own Prometheus
metrics (``vllm:*`` in the default registry). The prompt is the task prefix alone: vLLM's PaliGemma
processor inserts ``<image>`` x N and ``<bos>`` and appends ``"\\n"``. The project's vLLM plugin
(:mod:`service.engines.vllm_plugin`) makes that whole prompt one bidirectional block, as PaliGemma was trained;
the engine refuses to start without it.

Cancelling the task that awaits :meth:`VLLMEngine.generate` aborts the request inside vLLM (its
``generate`` catches the cancellation and calls ``abort``), which is how client disconnects and
deadlines free the engine.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from paligemma import PromptError
from paligemma.checkpoint import adapter_base, is_adapter
from service.engines.cpu_threads import (
    BIND,
    cpu_budget,
    pinned,
    scoped_environ,
    settle_descendants,
    torch_threads,
    vllm_cpu_environ,
)
from service.engines.protocol import (
    EngineDeadError,
    EngineError,
    FinishReason,
    Generation,
    GenerationRequest,
    UnknownAdapterError,
    warm_up_request,
)
from service.engines.vllm_config import engine_config
from service.engines.vllm_plugin import GRAMMAR_KEY
from service.settings import Settings

logger = logging.getLogger(__name__)


class VLLMEngine:
    """Engine protocol over ``vllm.v1.engine.async_llm.AsyncLLM``."""

    name = "vllm"

    def __init__(self, llm: Any, settings: Settings, tokenizer: Any) -> None:
        from vllm.lora.request import LoRARequest

        self._llm = llm
        self._tokenizer = tokenizer
        self.model_name = settings.served_model_name
        self._loras = {
            name: LoRARequest(lora_name=name, lora_int_id=i, lora_path=path)
            for i, (name, path) in enumerate(sorted(settings.loras.items()), start=1)
        }
        self._eos_ids = _eos_ids(tokenizer, settings.model)
        self._max_model_len = int(llm.vllm_config.model_config.max_model_len)
        self._max_prompt_tokens = settings.max_prompt_tokens
        self._in_flight = 0
        self._generate_calls = 0

    @property
    def adapters(self) -> list[str]:
        return sorted(self._loras)

    def tokenizer(self) -> Any:
        return self._tokenizer

    def stats(self) -> dict[str, float]:
        """Our in-flight count plus vLLM's own count of unfinished requests."""
        return {
            "in_flight": float(self._in_flight),
            "queue_depth": float(max(0, self._llm.get_num_unfinished_requests() - self._in_flight)),
            "engine_unfinished": float(self._llm.get_num_unfinished_requests()),
            "generate_calls": float(self._generate_calls),
        }

    async def check_health(self) -> None:
        if self._llm.errored:
            raise EngineDeadError("vLLM engine core died")

    async def generate(self, request: GenerationRequest) -> Generation:
        from vllm import SamplingParams
        from vllm.exceptions import VLLMValidationError
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.exceptions import EngineDeadError as VLLMDead

        if request.adapter is not None and request.adapter not in self._loras:
            raise UnknownAdapterError(request.adapter)
        params = SamplingParams(
            temperature=0.0,
            max_tokens=request.max_new_tokens,
            logprobs=1,
            skip_special_tokens=False,
            detokenize=False,  # _to_generation decodes the ids once; vLLM's per-token text was thrown away
            output_kind=RequestOutputKind.FINAL_ONLY,
            extra_args={GRAMMAR_KEY: request.grammar.to_dict()} if request.grammar is not None else None,
            skip_clone=True,  # made for this request alone: no deep copy (vLLM's own servers do the same)
        )
        prompt: dict[str, Any] = {"prompt": request.prefix, "multi_modal_data": {"image": request.image}}
        if request.image_id is not None:  # vLLM's processor cache key, instead of hashing the decoded pixels
            prompt["multi_modal_uuids"] = {"image": [request.image_id]}
        request_id = request.request_id or uuid.uuid4().hex
        lora = self._loras.get(request.adapter) if request.adapter else None
        final = None
        self._in_flight += 1
        self._generate_calls += 1
        try:
            async for output in self._llm.generate(prompt, params, request_id, lora_request=lora):
                final = output
        except VLLMDead as exc:
            raise EngineDeadError("vLLM engine core died") from exc
        except VLLMValidationError as exc:  # the request's fault (a prompt past max_model_len): 422, not 500
            raise PromptError(self._invalid_message(str(exc))) from exc
        except Exception as exc:  # one request failed; the engine goes on
            if self._llm.errored:
                raise EngineDeadError("vLLM engine core died") from exc
            raise EngineError(f"vLLM failed on request {request_id}") from exc
        finally:
            self._in_flight -= 1
        if final is None or not final.outputs:
            raise EngineError(f"vLLM returned no output for request {request_id}")
        return self._to_generation(final)

    def _invalid_message(self, vllm_message: str) -> str:
        if "maximum model length" not in vllm_message:
            return vllm_message
        return (
            f"the prompt and its image tokens do not fit this server's limit of {self._max_model_len} tokens: "
            f"shorten the prompt (the server is sized for {self._max_prompt_tokens} tokens of prompt text)"
        )

    def _to_generation(self, final: Any) -> Generation:
        completion = final.outputs[0]
        ids = list(completion.token_ids)
        logprobs = [_chosen_logprob(step, tok) for step, tok in zip(completion.logprobs or [], ids, strict=False)]
        while ids and ids[-1] in self._eos_ids:
            ids.pop()
        logprobs = logprobs[: len(ids)]
        reason: FinishReason = "stop" if completion.finish_reason == "stop" else "length"
        if completion.finish_reason not in ("stop", "length"):
            reason = "abort"
        return Generation(
            token_ids=tuple(ids),
            text=self._tokenizer.decode(ids, skip_special_tokens=True),
            logprobs=tuple(logprobs),
            finish_reason=reason,
            prompt_tokens=len(final.prompt_token_ids or ()),
        )

    async def warm_up(self) -> float:
        """Run :func:`~service.engines.protocol.warm_up_request` (not counted in :meth:`stats`); its seconds."""
        import time

        from vllm import SamplingParams

        request, start = warm_up_request(), time.monotonic()
        prompt = {"prompt": request.prefix, "multi_modal_data": {"image": request.image}}
        params = SamplingParams(temperature=0.0, max_tokens=request.max_new_tokens, detokenize=False)
        async for _ in self._llm.generate(prompt, params, f"warm-up-{uuid.uuid4().hex}"):
            pass
        return time.monotonic() - start

    async def aclose(self) -> None:
        self._llm.shutdown()


def _chosen_logprob(step: Any, token_id: int) -> float:
    entry = step.get(token_id) if step else None
    return float(entry.logprob) if entry is not None else float("nan")


def _eos_ids(tokenizer: Any, model: str) -> set[int]:
    ids = {int(tokenizer.eos_token_id)}
    try:
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(model).eos_token_id
        ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    except OSError:
        pass
    return ids


@asynccontextmanager
async def open_vllm_engine(settings: Settings) -> AsyncIterator[VLLMEngine]:
    """Start ``AsyncLLM`` for ``settings``; shut it down on exit (called from the app's lifespan)."""
    import torch
    from transformers import AutoTokenizer
    from vllm import envs as vllm_envs
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    if is_adapter(settings.model):
        base = adapter_base(settings.model) or "its base model"
        raise ValueError(
            f"--model {settings.model} is a LoRA adapter: vLLM serves the base with the adapter beside it,"
            f" --model {base} --lora NAME={settings.model} (or merge it: python -m finetune merge)"
        )
    on_gpu = torch.cuda.is_available()
    config = engine_config(settings, on_gpu)
    loras = settings.loras
    budget = None if on_gpu else cpu_budget(settings)
    cpu_environ = {} if budget is None else vllm_cpu_environ(budget)
    confine = BIND in cpu_environ
    if budget is not None and not confine:
        logger.info("%s=%s set by the user: cores left as they are", BIND, os.environ.get(BIND))
    logger.info(
        "starting vLLM: %s, dtype=%s, gpu=%s, adapters=%s, prefix-LM attention, max_model_len %d, "
        "max_num_batched_tokens %d (chunked prefill and prefix caching off)",
        settings.model,
        config.model_config.dtype,
        on_gpu,
        sorted(loras),
        config.model_config.max_model_len,
        config.scheduler_config.max_num_batched_tokens,
    )
    with scoped_environ(cpu_environ):  # read as the engine starts; not left behind for the next engine
        llm = AsyncLLM.from_vllm_config(config, usage_context=UsageContext.OPENAI_API_SERVER)
    with contextlib.ExitStack() as on_cpu:
        if budget is not None:  # the engine core and worker below the API process, on the model's cores
            settled = settle_descendants(budget, confine=confine)
            logger.info(
                "vLLM engine core and worker: %d threads at nice +%d%s",
                settled,
                budget.model_nice,
                f" on cores {list(budget.model_cpus)}" if confine else "",
            )
        if budget is not None and confine:  # the worker has bound its threads; the API process keeps to the rest
            on_cpu.enter_context(pinned(budget.api_cpus))
            on_cpu.enter_context(torch_threads(len(budget.api_cpus)))
            logger.info(
                "%s: vLLM worker on cores %s (VLLM_CPU_OMP_THREADS_BIND=%s), API process on cores %s",
                budget.describe(),
                list(budget.model_cpus),
                cpu_environ[BIND],
                list(budget.api_cpus),
            )
        try:
            blocks, block_size = llm.vllm_config.cache_config.num_gpu_blocks, llm.vllm_config.cache_config.block_size
            logger.info("vLLM KV cache: %s blocks of %s tokens", blocks, block_size)
            await llm.reset_mm_cache()
            # vLLM reads its environment variables afresh at each access (os.getenv), and its output handler
            # does so for every request at every step. Its engine core caches them once started; this process
            # does so too, while this engine runs.
            vllm_envs.enable_envs_cache()
            engine = VLLMEngine(llm, settings, AutoTokenizer.from_pretrained(settings.model))
            logger.info("warm-up generation: %.2f s: ready", await engine.warm_up())
            await llm.reset_mm_cache()  # the warm-up image is no request's
            yield engine
        finally:
            vllm_envs.disable_envs_cache()
            llm.shutdown()
