"""vLLM's scheduler, capped so that no request is ever preempted (the plugin's scheduler class).

vLLM preempts by recompute: it frees a request's KV blocks and later prefills prompt and generated
tokens again in one pass, which the prefix-LM layers compute non-causally, so generated tokens would
see the ones after them. Preemption happens only when a running request needs a block and none is free.
This scheduler admits at most as many running requests as can each grow to ``max_model_len`` inside the
KV cache vLLM actually allocated (known only here, in the engine core, after memory profiling), so a
block is always free. It also refuses to run PaliGemma without the prefix-LM layers or with a setting
that splits a prompt.
"""

from __future__ import annotations

import math
from typing import Any

from vllm.logger import init_logger
from vllm.v1.core.kv_cache_utils import get_max_concurrency_for_kv_cache_config
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from service.engines.vllm_plugin import PrefixLMNotActiveError, prefix_lm_problems

logger = init_logger(f"vllm.{__name__}")  # under "vllm" so the engine core process logs it


class _NoPreemption:
    """Mixin for vLLM's schedulers: check the prefix-LM invariants, then cap the running requests."""

    max_num_active_reqs: int

    def __init__(self, *, vllm_config: Any, kv_cache_config: Any, **kwargs: Any) -> None:
        super().__init__(vllm_config=vllm_config, kv_cache_config=kv_cache_config, **kwargs)  # type: ignore[call-arg]
        if not any(getattr(g.kv_cache_spec, "non_causal", False) for g in kv_cache_config.kv_cache_groups):
            raise PrefixLMNotActiveError(
                "the engine core built PaliGemma without the prefix-LM attention layers: is the "
                "paligemma_prefix_lm plugin excluded by VLLM_PLUGINS in the engine process?"
            )
        problems = prefix_lm_problems(vllm_config)
        if problems:
            raise PrefixLMNotActiveError("PaliGemma's prefix-LM mask needs " + "; ".join(problems))
        max_len = vllm_config.model_config.max_model_len
        fit = math.floor(get_max_concurrency_for_kv_cache_config(vllm_config, kv_cache_config))
        if fit < 1:
            raise PrefixLMNotActiveError(
                f"the KV cache ({kv_cache_config.num_blocks} blocks) holds no sequence of max_model_len "
                f"{max_len} tokens: give it more memory or lower max_model_len"
            )
        asked = self.max_num_active_reqs
        self.max_num_active_reqs = min(asked, fit)
        logger.info(
            "PaliGemma prefix-LM: KV cache of %d blocks holds %d sequences of max_model_len %d; "
            "running at most %d at once (max_num_seqs %d), so no request is ever preempted",
            kv_cache_config.num_blocks,
            fit,
            max_len,
            self.max_num_active_reqs,
            asked,
        )


class PrefixLMScheduler(_NoPreemption, Scheduler):
    """The synchronous scheduler (the CPU platform's) without preemption."""


class PrefixLMAsyncScheduler(_NoPreemption, AsyncScheduler):
    """The async scheduler (the CUDA default) without preemption."""


def prefix_lm_scheduler(*, vllm_config: Any, **kwargs: Any) -> Scheduler:
    """What ``scheduler_cls`` names: the no-preemption form of the scheduler vLLM would have picked."""
    cls = PrefixLMAsyncScheduler if vllm_config.scheduler_config.async_scheduling else PrefixLMScheduler
    return cls(vllm_config=vllm_config, **kwargs)
