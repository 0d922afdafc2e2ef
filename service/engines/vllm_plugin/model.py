"""PaliGemma whose text decoder attends non-causally over the prompt (vLLM model class of the plugin).

vLLM ships the layer: ``PrefillPrefixLMAttention`` keeps a decoder KV cache but builds its attention
metadata with ``causal=False``, so a prefill step attends bidirectionally while a one-token decode step
is unchanged, and its KV-cache spec is tagged ``non_causal``, which makes the engine core turn off
chunked prefill and prefix caching. The model builds vLLM's own PaliGemma with that layer in place of
the Gemma / Gemma 2 text attention (the vision tower keeps its own encoder attention); weights, LoRA and
the multimodal processor are the stock class's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from vllm.model_executor.layers.attention.prefill_prefix_lm_attention import PrefillPrefixLMAttention
from vllm.model_executor.models import gemma, gemma2
from vllm.model_executor.models.paligemma import PaliGemmaForConditionalGeneration


@contextlib.contextmanager
def _prefix_lm_text_attention() -> Iterator[None]:
    """While the text model is built, Gemma and Gemma 2 layers construct the prefix-LM attention.

    The decoder layers look ``Attention`` up in their module when they are constructed; swapping that
    one name for the duration keeps every other argument (heads, scale, soft-cap, sliding window) as
    vLLM computes it.
    """
    namespaces = [vars(gemma), vars(gemma2)]
    saved = [namespace["Attention"] for namespace in namespaces]
    for namespace in namespaces:
        namespace["Attention"] = PrefillPrefixLMAttention
    try:
        yield
    finally:
        for namespace, original in zip(namespaces, saved, strict=True):
            namespace["Attention"] = original


class PaliGemmaPrefixLM(PaliGemmaForConditionalGeneration):
    """vLLM's PaliGemma (1 and 2) with PaliGemma's trained mask: bidirectional prompt, causal output."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        with _prefix_lm_text_attention():
            super().__init__(vllm_config=vllm_config, prefix=prefix)
