"""Which attention PaliGemma 2's text layers use: every layer global (as big_vision trained it) or Gemma 2's.

Gemma 2 alternates sliding-window layers (window 4,096 in the released models) with global ones; a
PaliGemma 2 config says so in its text config: ``layer_types`` (``"sliding_attention"`` /
``"full_attention"`` per layer) and ``sliding_window``. big_vision, PaliGemma 2's public reference
implementation, has no sliding window (``big_vision/models/ppp/gemma.py``: every layer gets the one
prefix-LM mask). Up to 448 px the prompt and answer fit in the window and the two are the same; at 896 px
(4,096 image tokens + prefix) they are not. :func:`global_text_attention` turns every text layer of a
loaded config global, which both engines and the finetune apply before they build the model (see
``docs/how-paligemma-works.md``, section 8).

Only ``layer_types`` changes. ``sliding_window`` stays: transformers' PaliGemma and Gemma 2 forward
passes build a sliding mask whenever it is set (and fail without it), then use it on no layer.
Duck-typed on the config (no transformers import), so importing it costs nothing.
"""

from __future__ import annotations

from typing import Any, TypeVar

GLOBAL = "full_attention"
SLIDING = "sliding_attention"

C = TypeVar("C")


def _text_config(config: Any) -> Any:
    """The text (decoder) config of a ``PaliGemmaConfig``, or ``config`` itself if it is one."""
    text = getattr(config, "text_config", None)
    return text if text is not None else config


def sliding_layers(config: Any) -> list[int]:
    """Indices of the text layers that attend within a sliding window (empty for PaliGemma 1's Gemma,
    and for a Gemma 2 config whose layers are all global)."""
    text = _text_config(config)
    if getattr(text, "sliding_window", None) is None:
        return []
    return [i for i, kind in enumerate(getattr(text, "layer_types", None) or []) if kind == SLIDING]


def global_text_attention(config: C) -> C:
    """Every text layer of a PaliGemma config (or of its text config) attends globally, in place; returns
    the config, so it also serves as vLLM's ``hf_overrides`` callable. A no-op without sliding layers."""
    text = _text_config(config)
    if sliding_layers(text):
        text.layer_types = [GLOBAL if kind == SLIDING else kind for kind in text.layer_types]
    return config


def describe(config: Any, *, keep_sliding_window: bool) -> str:
    """One log line: the text attention a model built from ``config`` (after the choice) runs with."""
    text = _text_config(config)
    sliding, window = sliding_layers(text), getattr(text, "sliding_window", None)
    if sliding:
        return (
            f"text attention: the checkpoint's sliding window of {window} tokens on {len(sliding)} of "
            f"{len(text.layer_types)} layers, global on the others (keep_sliding_window)"
        )
    if window is not None and not keep_sliding_window:
        return (
            "text attention: every layer global over the whole sequence, as big_vision trained PaliGemma 2 "
            f"(the checkpoint's sliding window of {window} tokens is off; keep_sliding_window keeps it)"
        )
    return "text attention: every layer global (the checkpoint has no sliding window)"
