"""The service's settings as vLLM's engine config: dtype, context length, LoRA, PaliGemma's attention.

:func:`engine_config` is the one place that turns :class:`service.settings.Settings` into a ``VllmConfig``
and checks it: the prefix-LM invariants (:mod:`service.engines.vllm_plugin`), every PaliGemma 2 text layer
global unless ``keep_sliding_window`` (:mod:`paligemma.attention`), and a ``max_model_len`` sized for what a
PaliGemma request can need instead of the checkpoint's 8,192 positions. vLLM is imported inside functions.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal, cast

from paligemma.attention import describe as describe_attention
from paligemma.attention import global_text_attention, sliding_layers
from service.engines.precision import auto_dtype
from service.engines.vllm_plugin import GRAMMAR_PROCESSOR, SCHEDULER_CLASS, require_prefix_lm
from service.settings import Settings

VLLMDType = Literal["auto", "bfloat16", "float16", "float32"]
LoRARank = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]

logger = logging.getLogger(__name__)


def engine_config(settings: Settings, on_gpu: bool) -> Any:
    """vLLM's ``VllmConfig`` for ``settings``, checked (refuses what would serve PaliGemma with another mask)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext

    loras = settings.loras
    ranks = [_adapter_rank(path) for path in loras.values()]
    args = AsyncEngineArgs(
        # PaliGemma's prefix-LM mask (service.engines.vllm_plugin): each prompt in one pass, never recomputed
        enable_chunked_prefill=False,
        enable_prefix_caching=False,
        scheduler_cls=SCHEDULER_CLASS,
        logits_processors=[GRAMMAR_PROCESSOR],  # the detection grammar, for requests that carry one
        model=settings.model,
        served_model_name=settings.served_model_name,
        dtype=resolve_dtype(settings.dtype, on_gpu, settings.model),
        max_model_len=settings.max_model_len or default_max_model_len(settings),
        max_num_seqs=settings.max_num_seqs,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        tensor_parallel_size=settings.tensor_parallel_size,
        data_parallel_size=settings.data_parallel_size,
        enforce_eager=settings.enforce_eager,
        limit_mm_per_prompt={"image": 1},
        kv_cache_memory_bytes=int(settings.kv_cache_gib * 2**30) if settings.kv_cache_gib else None,
        enable_lora=bool(loras),
        max_lora_rank=_lora_rank_bucket(max([settings.max_lora_rank, *ranks])),
        max_loras=max(1, len(loras)),
        disable_log_stats=False,
        # PaliGemma 2: every text layer global, as big_vision trained it (paligemma.attention), unless kept
        hf_overrides={} if settings.keep_sliding_window else global_text_attention,
    )
    config = args.create_engine_config(UsageContext.OPENAI_API_SERVER)
    if settings.kv_cache_gib:  # vLLM's CPU platform lets VLLM_CPU_KVCACHE_SPACE override it: it wins here
        config.cache_config.kv_cache_memory_bytes = int(settings.kv_cache_gib * 2**30)
    require_prefix_lm(config)
    _check_text_attention(config, settings.keep_sliding_window)
    return config


def resolve_dtype(dtype: str, on_gpu: bool, model: str) -> VLLMDType:
    """``auto``: :func:`service.engines.precision.auto_dtype` (bfloat16 on a GPU, where PaliGemma 2's fp16 is
    unstable and vLLM's fp16 guard misses it, the top-level model_type being ``paligemma``; on the CPU the
    checkpoint's dtype if it is bfloat16 and the CPU runs it, else float32)."""
    if dtype != "auto":
        return cast(VLLMDType, dtype)
    chosen, why = auto_dtype(model, "cuda" if on_gpu else "cpu")
    logger.info("dtype auto: %s (%s)", chosen, why)
    return cast(VLLMDType, chosen)


def default_max_model_len(settings: Settings) -> int:
    """What a PaliGemma request can need: the checkpoint's image tokens, ``<bos>`` and ``"\\n"``, the prompt
    text and the longest answer the service lets a request ask for (1,026 tokens at 224 px), within the
    checkpoint's position limit. The checkpoint's own limit (8,192) would make the no-preemption scheduler
    reserve KV room for 8,192 tokens per request: one or two requests at once on a few GiB of cache."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(settings.model)
    vision = config.vision_config
    image_tokens = int((vision.image_size // vision.patch_size) ** 2)
    needed = image_tokens + 2 + settings.max_prompt_tokens + settings.max_new_tokens_limit
    return min(needed, int(config.text_config.max_position_embeddings))


def _lora_rank_bucket(rank: int) -> LoRARank:
    buckets: tuple[LoRARank, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)
    for bucket in buckets:
        if rank <= bucket:
            return bucket
    raise ValueError(f"LoRA rank {rank} is larger than vLLM supports (512)")


def _adapter_rank(path: str) -> int:
    config = json.loads((Path(path) / "adapter_config.json").read_text())
    return int(config.get("r", 16))


def _check_text_attention(config: Any, keep_sliding_window: bool) -> None:
    """Log the text attention vLLM will build, and refuse a config where the global override did not take.

    vLLM's Gemma 2 layer gives a layer the window only when ``layer_types[i]`` is ``sliding_attention``
    (``model_executor/models/gemma2.py``), and ``CacheConfig.sliding_window`` (which would reach every layer
    without a window of its own) is set only when every layer is sliding (``engine/arg_utils.py``). With no
    layer sliding and no model-level window, each layer's KV-cache spec is a full-attention one.
    """
    model_config = config.model_config
    logger.info("vLLM %s", describe_attention(model_config.hf_config, keep_sliding_window=keep_sliding_window))
    if not keep_sliding_window and (sliding_layers(model_config.hf_text_config) or config.cache_config.sliding_window):
        raise RuntimeError(
            "vLLM would keep PaliGemma 2's sliding window although keep_sliding_window is off: "
            f"layer_types {getattr(model_config.hf_text_config, 'layer_types', None)}, "
            f"cache sliding_window {config.cache_config.sliding_window}"
        )
