"""The transformers engine's model: device, dtype and attention chosen, weights loaded (blocking calls).

``load_model(settings)`` takes a checkpoint directory, a hub id or a LoRA adapter directory (its base with the
adapter beside it, not merged); ``--dtype auto`` follows :mod:`service.engines.precision`, and PaliGemma 2's
text layers are all global unless ``keep_sliding_window`` (:mod:`paligemma.attention`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from paligemma.attention import describe as describe_attention
from paligemma.attention import global_text_attention
from paligemma.checkpoint import adapter_base, is_adapter
from service.engines.precision import auto_dtype

if TYPE_CHECKING:
    import torch

    from service.settings import Settings

log = logging.getLogger(__name__)


def resolve_device_dtype(device: str, dtype: str, model: str) -> tuple[torch.device, torch.dtype]:
    """``auto`` device = cuda, then mps, then cpu; ``auto`` dtype: :func:`service.engines.precision.auto_dtype`
    for the checkpoint ``model`` (its base, for an adapter directory)."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if dtype == "auto":
        checkpoint = (adapter_base(model) or model) if is_adapter(model) else model
        dtype, why = auto_dtype(checkpoint, device)
        log.info("dtype auto: %s (%s)", dtype, why)
    return torch.device(device), getattr(torch, dtype)


def _model_config(checkpoint: str, keep_sliding_window: bool) -> Any:
    """The checkpoint's config, PaliGemma 2's text layers all global unless ``keep_sliding_window``
    (:mod:`paligemma.attention`); logs which attention the model runs with."""
    from transformers import PaliGemmaConfig

    config = PaliGemmaConfig.from_pretrained(checkpoint)
    if not keep_sliding_window:
        global_text_attention(config)
    log.info("%s", describe_attention(config, keep_sliding_window=keep_sliding_window))
    return config


def load_model(settings: Settings) -> tuple[Any, Any]:
    """Model and processor from a directory or hub id, on the chosen device and dtype (blocking)."""
    from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor

    device, dtype = resolve_device_dtype(settings.device, settings.dtype, settings.model)
    if not is_adapter(settings.model):
        processor = PaliGemmaProcessor.from_pretrained(settings.model)
        model = PaliGemmaForConditionalGeneration.from_pretrained(
            settings.model, dtype=dtype, config=_model_config(settings.model, settings.keep_sliding_window)
        )
        return model.to(device).eval(), processor  # type: ignore[arg-type]  # transformers types .to() oddly
    from peft import PeftModel  # an adapter directory: its base with the LoRA layers beside, not merged

    base = adapter_base(settings.model)
    if base is None:
        raise ValueError(f"the adapter {settings.model} names no base model (base_model_name_or_path)")
    has_processor = (Path(settings.model) / "processor_config.json").is_file()
    processor = PaliGemmaProcessor.from_pretrained(settings.model if has_processor else base)
    model = PaliGemmaForConditionalGeneration.from_pretrained(
        base, dtype=dtype, config=_model_config(base, settings.keep_sliding_window)
    )
    adapted = PeftModel.from_pretrained(model, settings.model)
    return adapted.to(device).eval(), processor
