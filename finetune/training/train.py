"""``train(cfg)``: LoRA, QLoRA or full finetuning of PaliGemma with the transformers ``Trainer``.

The Trainer (not a hand-written loop) gives checkpoints, resume, the progress bar, bf16 autocast, gradient
checkpointing and multi-GPU under ``accelerate launch`` / ``torchrun`` without code changes. What this module adds:
the data contract (:mod:`finetune.data`, :mod:`finetune.data.collate`), the method (:mod:`finetune.training.model`:
peft LoRA on the language model's linear layers, 4-bit QLoRA on CUDA, or full), freezing, a warmup-stable-decay
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
import os
import resource
from pathlib import Path
from typing import Any

import torch
from transformers import (
    PaliGemmaProcessor,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from finetune.config import TrainConfig
from finetune.data.collate import ExampleDataset, PaliGemmaCollator, sequence_lengths
from finetune.data.examples import detection_examples, vqa_examples
from finetune.data.loaders import load_coco, load_jsonl, load_vqa
from finetune.data.records import Example
from finetune.options import FlagError, flag, to_json
from finetune.training.callbacks import (
    Budget,
    BudgetProgress,
    Curve,
    ParameterBytes,
    Snapshots,
    gather_if_sharded,
    save_trained,
)
from finetune.training.checkpoints import SealCheckpoints, checkpoints, resume_point
from finetune.training.heldout import BEST, HeldOut, HeldOutTrainer, load_heldout
from finetune.training.model import load_model, training_precision, uses_checkpointing

log = logging.getLogger(__name__)


"""LoRA targets match only inside the language model: SigLIP also has ``q_proj``/``k_proj``/``v_proj``."""


def build_examples(cfg: TrainConfig) -> list[Example]:
    """All training examples: detection and segmentation prompts from COCO files, JSONL examples, VQA questions."""
    examples: list[Example] = []
    for i, path in enumerate(cfg.coco):
        dataset = load_coco(path, cfg.coco_images, synonyms=cfg.synonym_map, on_error=cfg.on_error)
        examples += detection_examples(
            dataset, cfg.absent_per_image, seed=cfg.seed + i, loc_stride=cfg.loc_stride, prompt_style=cfg.prompt_style
        )
        skipped = len(dataset.issues)
        log.info("%s: %d images, classes %s, %d skipped", path, len(dataset.images), dataset.classes, skipped)
    if cfg.segment_coco:
        from finetune.data.segments import configured_examples

        examples += configured_examples(cfg)
    for path in cfg.jsonl:
        examples += load_jsonl(path, on_error=cfg.on_error)
    for path in cfg.vqa:
        examples += vqa_examples(load_vqa(path, on_error=cfg.on_error))
    if not examples:
        raise ValueError("the training data holds no usable example (see the skipped-record warnings)")
    return examples


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


"""On the CPU, gradient checkpointing is on by default for models above this size (every real PaliGemma):
PaliGemma 2 3B at batch 8 would otherwise keep about 4 GiB of activations per example."""


def train_record(cfg: TrainConfig) -> dict[str, Any]:
    """What ``train_config.json`` records of a run: the config, with the base model's resolved path (a full run
    has no LoRA settings)."""
    record = {**to_json(cfg), "base": str(Path(cfg.base).resolve())}
    return {k: v for k, v in record.items() if cfg.method != "full" or not k.startswith("lora_")}


def first_process() -> bool:
    """Rank 0 under ``torchrun`` / ``accelerate launch`` (which set ``RANK``), or the only process: the one that
    writes the run's files and its summary. Usable before the Trainer exists (the Trainer's own check isn't)."""
    return os.environ.get("RANK", "0") == "0"


def _workers(cfg: TrainConfig) -> int:
    if cfg.workers is not None:
        return cfg.workers
    return min(4, max(1, (os.cpu_count() or 2) - 1)) if torch.cuda.is_available() else 0


def training_arguments(cfg: TrainConfig, model: Any, heldout: HeldOut | None) -> TrainingArguments:
    """The Trainer's arguments for ``cfg``: checkpoints every ``--save-steps`` (rotated by
    :mod:`finetune.training.checkpoints`, not by the Trainer), held-out scoring every ``--eval-steps``."""
    precision = training_precision(cfg)
    workers = _workers(cfg)
    return TrainingArguments(
        output_dir=cfg.out,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
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
        save_total_limit=None,
        eval_strategy="steps" if heldout is not None else "no",
        eval_steps=cfg.eval_steps or cfg.save_steps,
        seed=cfg.seed,
        bf16=precision == "bf16",
        gradient_checkpointing=uses_checkpointing(cfg, model),
        gradient_checkpointing_kwargs={"use_reentrant": False},
        remove_unused_columns=False,
        label_names=["labels"],
        dataloader_num_workers=workers,
        dataloader_persistent_workers=workers > 0,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
        report_to=list(cfg.report_to) or "none",
    )


def train(cfg: TrainConfig) -> Path:
    """Run training; returns the adapter/ (lora, qlora) or model/ (full) directory.

    The same config trains the same weights in any process (everything is seeded before the model is built,
    LoRA's random init included), and a run killed at any moment then restarted with ``--resume`` ends
    with the same weights as one never interrupted (:mod:`finetune.training.checkpoints`)."""
    _check_launch(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    record = train_record(cfg)
    if first_process():
        (out / "train_config.json").write_text(json.dumps(record, indent=2) + "\n")
    examples = build_examples(cfg)
    heldout = load_heldout(cfg)
    max_length = _max_length(cfg, examples)  # before the model loads: a bad --max-length fails in seconds
    resume = _resume_point(cfg, out)
    model, processor = load_model(cfg)
    args = training_arguments(cfg, model, heldout)
    budget = Budget(cfg.max_minutes, already=resume[1]["seconds"] if resume else 0.0)
    callbacks: list[TrainerCallback] = [
        budget,
        Curve(out / "learning_curve.json", budget, resumed_at=resume[1]["step"] if resume else None),
        SealCheckpoints(out, cfg.save_total_limit, budget),
        held := ParameterBytes(),
    ]
    if cfg.snapshot_steps:
        callbacks.append(Snapshots(out / "snapshots", cfg.snapshot_steps, budget, processor))
    common: dict[str, Any] = {
        "model": model,
        "args": args,
        "train_dataset": ExampleDataset(examples, processor, on_error=cfg.on_error),
        "data_collator": PaliGemmaCollator(processor, max_length),
        "callbacks": callbacks,
    }
    if heldout is not None:
        best = out / BEST if cfg.keep_best else None
        trainer: Trainer = HeldOutTrainer(**common, heldout=heldout, processor=processor, best_dir=best)
    else:
        trainer = Trainer(**common)
    if cfg.max_minutes and trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(BudgetProgress(budget))
    log.info(
        "training %s on %d examples (%s, %s, gradient checkpointing %s, %d data workers)",
        cfg.method,
        len(examples),
        "bf16" if args.bf16 else "fp32",
        trainer.args.device,
        "on" if args.gradient_checkpointing else "off",
        args.dataloader_num_workers,
    )
    trainer.train(resume_from_checkpoint=str(resume[0]) if resume else None)
    if isinstance(trainer, HeldOutTrainer) and trainer.scored_step != trainer.state.global_step:
        trainer.evaluate()  # stopped early (--max-minutes): the final weights are scored too
    final = out / ("model" if cfg.method == "full" else "adapter")
    gathered = gather_if_sharded(trainer.model)  # FSDP: every rank takes part in the gather
    if trainer.is_world_process_zero():
        save_trained(trainer.model, processor, final, gathered)
        (final / "train_config.json").write_text(json.dumps(record, indent=2) + "\n")
        result = {
            "steps": trainer.state.global_step,
            "seconds": round(budget.elapsed(), 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "parameter_bytes": held.held,
        }
        (out / "train_result.json").write_text(json.dumps(result) + "\n")
        log.info("saved %s after %d steps, %.0f s", final, trainer.state.global_step, budget.elapsed())
    return final


def _check_launch(cfg: TrainConfig) -> None:
    """``accelerate launch`` with an FSDP config on a machine without GPUs trains plain data parallel (every
    process holding the whole model: accelerate runs FSDP only on GPU backends), so it is refused."""
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if fsdp and (cfg.eval_coco or cfg.eval_vqa or cfg.snapshot_steps):
        raise FlagError(
            f"under FSDP, {flag('eval_coco')}/{flag('eval_vqa')} and {flag('snapshot_steps')} are not supported yet "
            "(they run on the first rank alone, and a sharded model needs every rank): score the saved model with "
            "`python -m finetune eval` instead"
        )
    if fsdp and not torch.cuda.is_available():
        raise FlagError(
            "FSDP needs GPUs: accelerate runs FSDP only on GPU backends, and on the CPU this launch would train "
            "plain data parallel with every process holding the whole model. Here, launch with torchrun (data "
            "parallel); run the FSDP config on GPUs"
        )


def _resume_point(cfg: TrainConfig, out: Path) -> tuple[Path, dict[str, Any]] | None:
    if not cfg.resume:
        if checkpoints(out):
            log.warning(
                "%s holds checkpoints of an earlier run: starting from scratch (%s continues it)", out, flag("resume")
            )
        return None
    found = resume_point(out, move_aside=first_process())
    if found is None:
        log.warning("%s: no complete checkpoint-N in %s, starting from scratch", flag("resume"), out)
    else:
        log.info("resuming from %s (step %d)", found[0], found[1]["step"])
    return found
