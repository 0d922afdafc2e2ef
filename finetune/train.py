"""``train(cfg)``: LoRA, QLoRA or full finetuning of PaliGemma with the transformers ``Trainer``.

The Trainer (not a hand-written loop) gives checkpoints, resume, the progress bar, bf16 autocast, gradient
checkpointing and multi-GPU under ``accelerate launch`` / ``torchrun`` without code changes. What this
module adds: the data contract (:mod:`finetune.data`, :mod:`finetune.collate`), the method (peft LoRA on
the language model's linear layers, 4-bit QLoRA on CUDA, or full), freezing, a warmup-stable-decay
schedule by steps, a wall-clock safety stop, a learning curve and snapshots after fixed steps. Output
layout of ``cfg.out``::

    train_config.json      the config, with the resolved base model path (merge reads it)
    learning_curve.json    {"step", "seconds", "loss", ...} every --logging-steps
    train_result.json      {"steps", "seconds"} of the finished run
    checkpoint-N/          Trainer checkpoints (resume)
    adapter/               lora/qlora: adapter + adapter_config.json (base_model_name_or_path) + processor
    model/                 full: the whole model in the hub layout (paligemma.checkpoint.save_checkpoint)
    snapshots/step-N/      --snapshot-steps: the model (full) or adapter after step N (+ snapshot.json)
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import (
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer_utils import get_last_checkpoint

from finetune.collate import ExampleDataset, PaliGemmaCollator, sequence_lengths
from finetune.config import FlagError, TrainConfig, flag, to_json
from finetune.data import Example, detection_examples, load_coco, load_jsonl, load_vqa, vqa_examples
from paligemma.attention import describe as describe_attention
from paligemma.attention import global_text_attention
from paligemma.checkpoint import save_checkpoint
from service.engines.precision import auto_dtype

log = logging.getLogger(__name__)
LANGUAGE_MODEL_PATTERN = r".*language_model.*\.({})$"
"""LoRA targets match only inside the language model: SigLIP also has ``q_proj``/``k_proj``/``v_proj``."""


def build_examples(cfg: TrainConfig) -> list[Example]:
    """All training examples: detection prompts from COCO files, JSONL examples and VQA questions."""
    examples: list[Example] = []
    for i, path in enumerate(cfg.coco):
        dataset = load_coco(path, cfg.coco_images, synonyms=cfg.synonym_map, on_error=cfg.on_error)
        examples += detection_examples(
            dataset, cfg.absent_per_image, seed=cfg.seed + i, loc_stride=cfg.loc_stride, prompt_style=cfg.prompt_style
        )
        skipped = len(dataset.issues)
        log.info("%s: %d images, classes %s, %d skipped", path, len(dataset.images), dataset.classes, skipped)
    for path in cfg.jsonl:
        examples += load_jsonl(path, on_error=cfg.on_error)
    for path in cfg.vqa:
        examples += vqa_examples(load_vqa(path, on_error=cfg.on_error))
    if not examples:
        raise ValueError("the training data holds no usable example (see the skipped-record warnings)")
    return examples


def _precision(cfg: TrainConfig) -> str:
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
    elif cfg.method == "lora" and _precision(cfg) == "bf16":
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
            model, use_gradient_checkpointing=_checkpointing(cfg)
        )
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=LANGUAGE_MODEL_PATTERN.format("|".join(cfg.lora_targets)),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora), processor


def _max_length(cfg: TrainConfig, examples: list[Example]) -> int | None:
    """``--max-length`` checked against the checkpoint's image tokens and the data (None: nothing is cut)."""
    processor = PaliGemmaProcessor.from_pretrained(cfg.base)
    longest_prompt, longest = sequence_lengths(processor, examples)
    image_tokens = processor.image_seq_length
    if cfg.max_length is None:
        log.info("longest example %d tokens (%d image tokens + text): nothing is cut", longest, image_tokens)
        return None
    if cfg.max_length <= longest_prompt:
        raise FlagError(
            f"{flag('max_length')} {cfg.max_length} leaves no room for an answer: the longest prompt is "
            f"{longest_prompt} tokens ({image_tokens} image tokens + <bos> + prefix + newline). Give at least "
            f"{longest_prompt + 1}, or leave it unset ({longest} holds every example whole)"
        )
    if cfg.max_length < longest:
        log.warning(
            "%s %d cuts the answers of examples longer than that (longest: %d tokens)",
            flag("max_length"),
            cfg.max_length,
            longest,
        )
    return cfg.max_length


CHECKPOINTING_ABOVE_PARAMS = 1_000_000_000
"""On the CPU, gradient checkpointing is on by default for models above this size (every real PaliGemma):
PaliGemma 2 3B at batch 8 would otherwise keep about 4 GiB of activations per example."""


def _checkpointing(cfg: TrainConfig, model: Any = None) -> bool:
    if cfg.gradient_checkpointing is not None:
        return cfg.gradient_checkpointing
    if torch.cuda.is_available() or model is None:
        return torch.cuda.is_available()
    return sum(p.numel() for p in model.parameters()) > CHECKPOINTING_ABOVE_PARAMS


class Budget(TrainerCallback):
    """The wall-clock safety stop: ends training once ``minutes`` of training time have passed (the run
    then saves as usual). Also the clock that the learning curve and snapshots report."""

    def __init__(self, minutes: float | None) -> None:
        self.minutes = minutes
        self.start = time.monotonic()

    def on_train_begin(self, args: Any, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self.start = time.monotonic()

    def on_step_end(self, args: Any, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if self.minutes is not None and self.elapsed() >= self.minutes * 60:
            log.warning(
                "%s of %.1f min reached at step %d of %d: stopping early",
                flag("max_minutes"),
                self.minutes,
                state.global_step,
                state.max_steps,
            )
            control.should_training_stop = True

    def elapsed(self) -> float:
        return time.monotonic() - self.start


class BudgetProgress(ProgressCallback):
    """The progress bar of a run with a time budget: it fills with whichever ends the run first, the steps
    or the minutes (with only the steps, a minute-bound run shows an ETA of days)."""

    def __init__(self, budget: Budget) -> None:
        super().__init__()
        self.budget = budget

    def on_train_begin(self, args: Any, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if state.is_world_process_zero:
            form = "{l_bar}{bar}| {n:.0f}/{total} % [{elapsed}<{remaining}{postfix}]"
            self.training_bar = tqdm(total=100, bar_format=form, dynamic_ncols=True)
        self.current_step = 0

    def on_step_end(self, args: Any, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if state.is_world_process_zero and self.training_bar is not None and self.budget.minutes:
            done = max(state.global_step / state.max_steps, self.budget.elapsed() / (self.budget.minutes * 60))
            self.training_bar.set_postfix_str(f"step {state.global_step}", refresh=False)
            self.training_bar.update(min(100.0, 100 * done) - self.training_bar.n)


class Curve(TrainerCallback):
    """Writes every logged loss with its step and training seconds to ``learning_curve.json``."""

    def __init__(self, path: Path, budget: Budget) -> None:
        self.path, self.budget, self.points = path, budget, []  # type: ignore[var-annotated]

    def on_train_begin(self, args: Any, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if state.is_world_process_zero:  # a run shorter than --logging-steps still has its (empty) curve
            self.path.write_text(json.dumps(self.points) + "\n")

    def on_log(self, args: Any, state: TrainerState, control: TrainerControl, logs: Any = None, **kw: Any) -> None:
        if logs and "loss" in logs and state.is_world_process_zero:
            point = {"step": state.global_step, "seconds": round(self.budget.elapsed(), 2)}
            point.update({k: logs[k] for k in ("loss", "grad_norm", "learning_rate", "epoch") if k in logs})
            self.points.append(point)
            self.path.write_text(json.dumps(self.points, indent=1) + "\n")


class Snapshots(TrainerCallback):
    """Saves the model (full) or adapter after given optimiser steps, for a held-out learning curve."""

    def __init__(self, out: Path, steps: tuple[int, ...], budget: Budget, processor: Any) -> None:
        self.out, self.marks, self.budget, self.processor = out, set(steps), budget, processor

    def on_step_end(self, args: Any, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if state.global_step in self.marks and state.is_world_process_zero:
            path = self.out / f"step-{state.global_step}"
            save_trained(kw["model"], self.processor, path)
            info = {"step": state.global_step, "seconds": round(self.budget.elapsed(), 2)}
            (path / "snapshot.json").write_text(json.dumps(info) + "\n")


def save_trained(model: Any, processor: Any, out: Path) -> Path:
    """Adapter (peft model) or the full model in the hub layout, plus the processor."""
    if hasattr(model, "peft_config"):
        model.save_pretrained(out)
        processor.save_pretrained(out)
        return out
    return save_checkpoint(model, processor, out)


def train_record(cfg: TrainConfig) -> dict[str, Any]:
    """What ``train_config.json`` records of a run: the config, with the base model's resolved path."""
    return {**to_json(cfg), "base": str(Path(cfg.base).resolve())}


def train(cfg: TrainConfig) -> Path:
    """Run training; returns the adapter/ (lora, qlora) or model/ (full) directory."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    record = train_record(cfg)
    (out / "train_config.json").write_text(json.dumps(record, indent=2) + "\n")
    examples = build_examples(cfg)
    max_length = _max_length(cfg, examples)  # before the model loads: a bad --max-length fails in seconds
    model, processor = load_model(cfg)
    precision = _precision(cfg)
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps,
        lr_scheduler_type="warmup_stable_decay" if cfg.decay_steps else cfg.scheduler,
        lr_scheduler_kwargs={"num_decay_steps": cfg.decay_steps, "decay_type": "linear"} if cfg.decay_steps else {},
        max_steps=cfg.max_steps,
        num_train_epochs=cfg.epochs,
        logging_steps=cfg.logging_steps,
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        bf16=precision == "bf16",
        gradient_checkpointing=_checkpointing(cfg, model),
        gradient_checkpointing_kwargs={"use_reentrant": False},
        remove_unused_columns=False,
        label_names=["labels"],
        dataloader_num_workers=cfg.workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
    )
    budget = Budget(cfg.max_minutes)
    callbacks: list[TrainerCallback] = [budget, Curve(out / "learning_curve.json", budget)]
    if cfg.snapshot_steps:
        callbacks.append(Snapshots(out / "snapshots", cfg.snapshot_steps, budget, processor))
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=ExampleDataset(examples),
        data_collator=PaliGemmaCollator(processor, max_length),
        callbacks=callbacks,
    )
    if cfg.max_minutes and trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(BudgetProgress(budget))
    resume = get_last_checkpoint(str(out)) if cfg.resume else None  # type: ignore[no-untyped-call]
    if cfg.resume and resume is None:
        log.warning("%s: no checkpoint-N in %s, starting from scratch", flag("resume"), out)
    log.info(
        "training %s on %d examples (%s, %s, gradient checkpointing %s)",
        cfg.method,
        len(examples),
        precision,
        trainer.args.device,
        "on" if args.gradient_checkpointing else "off",
    )
    trainer.train(resume_from_checkpoint=resume)
    final = out / ("model" if cfg.method == "full" else "adapter")
    if trainer.is_world_process_zero():
        save_trained(trainer.model, processor, final)
        (final / "train_config.json").write_text(json.dumps(record, indent=2) + "\n")
        result = {"steps": trainer.state.global_step, "seconds": round(budget.elapsed(), 1)}
        (out / "train_result.json").write_text(json.dumps(result) + "\n")
        log.info("saved %s after %d steps, %.0f s", final, trainer.state.global_step, budget.elapsed())
    return final
