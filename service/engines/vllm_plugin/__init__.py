"""vLLM plugin: PaliGemma served with the attention it was trained with, and never preempted.

PaliGemma attends bidirectionally over one block, image + ``<bos>`` + prefix + ``"\\n"``; only the
generated tokens are causal. Stock vLLM 0.32 makes only the image tokens bidirectional on CUDA and
nothing on CPU. This plugin, loaded by vLLM in every process it starts (entry point group
``vllm.general_plugins``, see ``pyproject.toml``), replaces the PaliGemma architecture with
:class:`~service.engines.vllm_plugin.model.PaliGemmaPrefixLM`, whose text attention runs non-causally over
the prompt. The service sends the task prefix alone, so the whole prompt is the prefix and every later
token is a one-token decode step: exactly PaliGemma's mask.

That holds only while each prompt is computed in one pass and never recomputed with its generated
tokens. :mod:`service.engines.vllm_plugin.scheduler` makes sure of it (no chunked prefill, no prefix caching, no
preemption). :func:`require_prefix_lm` is the engine's startup check. Importing this module is cheap:
vLLM is imported only by :func:`register` and the two submodules.
"""

from __future__ import annotations

from typing import Any

ARCHITECTURE = "PaliGemmaForConditionalGeneration"
MODEL_CLASS = "service.engines.vllm_plugin.model:PaliGemmaPrefixLM"
SCHEDULER_CLASS = "service.engines.vllm_plugin.scheduler.prefix_lm_scheduler"
ENTRY_POINT = "paligemma_prefix_lm"
GRAMMAR_PROCESSOR = "service.engines.vllm_plugin.grammar:DetectionGrammarProcessor"
"""The detection grammar's logits processor (``--logits-processors``), in :mod:`.grammar`."""
GRAMMAR_KEY = "paligemma_grammar"
"""Where a request's grammar travels: ``SamplingParams.extra_args[GRAMMAR_KEY]``."""


class PrefixLMNotActiveError(RuntimeError):
    """vLLM would serve PaliGemma with a mask other than the one it was trained with."""


def register() -> None:
    """The entry point vLLM calls in each of its processes: PaliGemma 1 and 2 get the prefix-LM model."""
    from vllm import ModelRegistry

    ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)


def plugin_active() -> bool:
    """Whether this process's vLLM model registry maps PaliGemma to the prefix-LM model."""
    from vllm.model_executor.models.registry import ModelRegistry
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # type: ignore[no-untyped-call]
    registered = ModelRegistry.models.get(ARCHITECTURE)
    return f"{getattr(registered, 'module_name', '')}:{getattr(registered, 'class_name', '')}" == MODEL_CLASS


def require_prefix_lm(config: Any) -> None:
    """Refuse a vLLM config (``VllmConfig``) that could serve PaliGemma with the wrong attention mask."""
    import os

    if not plugin_active():
        raise PrefixLMNotActiveError(
            f"vLLM has not loaded the {ENTRY_POINT!r} plugin (VLLM_PLUGINS={os.environ.get('VLLM_PLUGINS')!r}): "
            "it would serve PaliGemma with a causal text mask. Install the project (`make setup` or "
            "`pip install -e .`) so its vllm.general_plugins entry point exists, and let VLLM_PLUGINS include it."
        )
    problems = prefix_lm_problems(config)
    if problems:
        raise PrefixLMNotActiveError("PaliGemma's prefix-LM mask needs " + "; ".join(problems))


def prefix_lm_problems(config: Any) -> list[str]:
    """What in a ``VllmConfig`` would let a prompt be split or recomputed (empty: nothing)."""
    scheduler, cache = config.scheduler_config, config.cache_config
    problems = []
    if scheduler.enable_chunked_prefill:
        problems.append("chunked prefill off (a prompt split in chunks attends causally across them)")
    if cache.enable_prefix_caching:
        problems.append("prefix caching off (cached blocks were computed without the rest of the prompt)")
    if scheduler.long_prefill_token_threshold > 0:
        problems.append("long_prefill_token_threshold 0 (it splits long prompts)")
    if config.speculative_config is not None:
        problems.append("no speculative decoding (a multi-token verify step attends non-causally)")
    if scheduler.max_num_batched_tokens < config.model_config.max_model_len:
        problems.append(
            f"max_num_batched_tokens ({scheduler.max_num_batched_tokens}) >= max_model_len "
            f"({config.model_config.max_model_len}), so the longest prompt is scheduled in one step"
        )
    if scheduler.scheduler_cls != SCHEDULER_CLASS:
        problems.append(f"scheduler_cls {SCHEDULER_CLASS!r} (it rules out preemption)")
    return problems
