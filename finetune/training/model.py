"""The model a run trains: loaded in its precision, LoRA/QLoRA layers added, gradient checkpointing decided.

LoRA targets only the language model's projections (``LANGUAGE_MODEL_PATTERN``); QLoRA loads the base in
4 bits; gradient checkpointing is on by default above ``CHECKPOINTING_ABOVE_PARAMS`` parameters.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import (
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
)

from finetune.config import TrainConfig
from finetune.options import flag
from paligemma.attention import describe as describe_attention
from paligemma.attention import global_text_attention
from service.engines.precision import auto_dtype

log = logging.getLogger(__name__)


LANGUAGE_MODEL_PATTERN = r".*language_model.*\.({})$"


def training_precision(cfg: TrainConfig) -> str:
    """``auto``: bf16 on a GPU that supports it; on the CPU, bf16 for a checkpoint stored in bfloat16 on a CPU
    that runs it (:func:`service.engines.precision.auto_dtype`), else fp32."""
    if cfg.precision != "auto":
        return cfg.precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if auto_dtype(cfg.base, "cpu")[0] == "bfloat16" else "fp32"


def load_model(cfg: TrainConfig) -> tuple[Any, Any]:
    """Base model (4-bit for qlora) with the method applied, and its processor."""
    processor = PaliGemmaProcessor.from_pretrained(cfg.base)
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if cfg.method == "qlora":
        if not torch.cuda.is_available():
            raise RuntimeError(f"{flag('method')} qlora needs a CUDA GPU (bitsandbytes 4-bit); use lora or full here")
        from transformers import BitsAndBytesConfig

        kwargs = {
            "dtype": torch.bfloat16,
            "quantization_config": BitsAndBytesConfig(  # type: ignore[no-untyped-call]
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
            ),
            "device_map": {"": torch.cuda.current_device()},
        }
    elif cfg.method == "lora" and training_precision(cfg) == "bf16":
        kwargs["dtype"] = torch.bfloat16  # the frozen base in bf16; LoRA weights stay fp32
    base = str(Path(cfg.base).resolve()) if Path(cfg.base).is_dir() else cfg.base  # recorded in the adapter
    config = PaliGemmaConfig.from_pretrained(base)
    if not cfg.keep_sliding_window:
        global_text_attention(config)  # as big_vision trained PaliGemma 2 (paligemma.attention)
    log.info("%s", describe_attention(config, keep_sliding_window=cfg.keep_sliding_window))
    model = PaliGemmaForConditionalGeneration.from_pretrained(base, config=config, **kwargs)
    if cfg.method == "full":
        for part, frozen in (("vision_tower", cfg.freeze_vision), ("multi_modal_projector", cfg.freeze_projector)):
            for param in getattr(model.model, part).parameters():
                param.requires_grad_(not frozen)
        return model, processor
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.method == "qlora":
        model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
            model, use_gradient_checkpointing=uses_checkpointing(cfg)
        )
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=LANGUAGE_MODEL_PATTERN.format("|".join(cfg.lora_targets)),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora), processor


CHECKPOINTING_ABOVE_PARAMS = 1_000_000_000


def uses_checkpointing(cfg: TrainConfig, model: Any = None) -> bool:
    if cfg.gradient_checkpointing is not None:
        return cfg.gradient_checkpointing
    if torch.cuda.is_available() or model is None:
        return torch.cuda.is_available()
    return bool(sum(p.numel() for p in model.parameters()) > CHECKPOINTING_ABOVE_PARAMS)
