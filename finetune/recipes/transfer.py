"""Teach the shipped demo model a new class with LoRA (``make demo-lora``, ``python -m finetune lora-demo``).

The path users take with a real PaliGemma, on the CPU: start from a trained model (``models/demo``: circles,
squares, triangles), generate data with a fourth shape, train a LoRA adapter on the language model only
(what vLLM serves per request), merge it, and measure every way the result can be served.

Data (each set with its own seed): ``new`` images hold all four shapes and are asked all four classes;
``old`` images hold only the three old shapes and are asked the old three (replay, so the old prompt is
not forgotten); ``heldout`` holds all four shapes and is never trained on.

Held-out figures, for both prompts (``detect circle ; square ; triangle ; diamond`` and the old
``detect circle ; square ; triangle``), ground truth and mAP limited to the asked classes:

- ``base``: the demo model (transformers engine);
- ``adapter (transformers)``: the base with the adapter's LoRA layers, not merged;
- ``merged (transformers)`` and ``merged (vLLM)``: the merged float32 checkpoint;
- ``adapter per request (vLLM)``: the base on vLLM started with ``--lora diamond=ADAPTER``, each request
  selecting ``adapter=diamond``.

Every generated text is kept, so the report also says how many ``detect`` answers of each served form
equal the adapter's token for token. Pictures: ``eval --compare`` of the base against the merged model.
Training is bounded by steps (cached in ``work`` while its config is unchanged); wall time is only reported.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.config import MergeConfig, TrainConfig
from finetune.data.loaders import load_coco
from finetune.data.records import DetectionSet
from finetune.data.synth import generate_cached
from finetune.options import flag, to_json

log = logging.getLogger(__name__)
OLD = ("circle", "square", "triangle")


@dataclass
class TransferConfig:
    """The recipe's knobs; the defaults made the shipped adapter (``models/demo-diamond``)."""

    base: str = "models/demo"
    """The model to adapt (hub layout)."""
    new_class: str = "diamond"
    """The shape to teach (one that finetune.data.synth draws)."""
    adapter: str = "artifacts/demo-lora/adapter"
    """Where the adapter goes, with its card (README.md) and report.json; its base is recorded relative to it."""
    out: str = "artifacts/demo-lora"
    """merged/ (the merged float32 checkpoint), report/report.json and compare/ (``eval --compare``: pictures/,
    contact_sheet.png)."""
    work: str = "artifacts/demo-lora-work"
    """Synthetic data and the training run."""
    new_images: int = 4000
    """Training images with all four shapes, asked all four classes (seed --new-seed)."""
    old_images: int = 4000
    """Training images with the old three shapes, asked the old three (seed --old-seed)."""
    heldout_images: int = 200
    """Held-out images with all four shapes (seed --heldout-seed)."""
    new_seed: int = 11
    old_seed: int = 12
    heldout_seed: int = 13
    lora_r: int = 32
    """LoRA rank (the text model is 128 wide)."""
    lora_alpha: int = 64
    """LoRA scale numerator (scale alpha / r = 2)."""
    lr: float = 1e-3
    """Peak learning rate."""
    steps: int = 6000
    """Optimiser steps (batch --batch-size)."""
    decay_steps: int = 2000
    """The last steps, over which the learning rate falls linearly to 0."""
    warmup_steps: int = 100
    batch_size: int = 32
    threads: int = 2
    """CPU threads for training (the weights depend on it, not on the machine's load)."""
    seed: int = 0
    pictures: int = 12
    """Before/after pictures (base left, LoRA right)."""
    force: bool = False
    """Train again even if --work holds this run."""

    def __post_init__(self) -> None:
        from finetune.data.synth import SHAPES

        if self.new_class not in SHAPES or self.new_class in OLD:
            raise ValueError(f"{flag('new_class')} must be a shape synth draws besides {', '.join(OLD)}")
        if len({self.new_seed, self.old_seed, self.heldout_seed}) != 3:
            raise ValueError(f"{flag('new_seed')}, {flag('old_seed')} and {flag('heldout_seed')} must differ")


def train_config(cfg: TransferConfig, new: Path, old: Path) -> TrainConfig:
    """The LoRA run: language model only (TrainConfig's default targets), every prompt listing all classes."""
    return TrainConfig(
        base=cfg.base,
        out=str(Path(cfg.work) / "run"),
        method="lora",
        coco=(str(new / "annotations.json"), str(old / "annotations.json")),
        absent_per_image=3,
        lora_r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=0.0,
        lr=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.decay_steps,
        batch_size=cfg.batch_size,
        max_steps=cfg.steps,
        threads=cfg.threads,
        seed=cfg.seed,
        logging_steps=50,
        save_steps=100_000,
        precision="fp32",
    )


def train_cached(run: TrainConfig, force: bool) -> dict[str, Any]:
    """Train unless ``run.out`` already holds this exact run; returns its train_result.json."""
    from finetune.training.train import train, train_record

    out = Path(run.out)
    record = train_record(run)
    done = out / "train_result.json"
    same = (out / "train_config.json").is_file() and json.loads((out / "train_config.json").read_text()) == record
    if force or not (same and done.is_file()):
        shutil.rmtree(out, ignore_errors=True)
        train(run)
    else:
        log.info("%s already holds this run; not training again (%s to retrain)", out, flag("force"))
    return dict(json.loads(done.read_text()))


def ship_adapter(trained: Path, adapter: Path, base: Path) -> Path:
    """Copy the adapter's weights and config to ``adapter``, its base recorded relative to it, so the folder
    and its base can move together (``paligemma.checkpoint.adapter_base``)."""
    adapter.mkdir(parents=True, exist_ok=True)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy2(trained / name, adapter / name)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = os.path.relpath(base.resolve(), adapter.resolve())
    (adapter / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return adapter


def run_transfer(cfg: TransferConfig) -> dict[str, Any]:
    """Data, LoRA training, merge, the served-forms table and pictures; returns the report."""
    from finetune.evaluation.served import compare_pictures, served_forms
    from finetune.recipes.card import write_adapter_card
    from finetune.training.merge import merge

    work, out, adapter = Path(cfg.work), Path(cfg.out), Path(cfg.adapter)
    shapes = (*OLD, cfg.new_class)
    new = generate_cached(work / "new", cfg.new_images, cfg.new_seed, shapes=shapes)
    old = generate_cached(work / "old", cfg.old_images, cfg.old_seed, shapes=OLD)
    held = generate_cached(work / "heldout", cfg.heldout_images, cfg.heldout_seed, shapes=shapes)
    run = train_config(cfg, new, old)
    result = train_cached(run, cfg.force)
    ship_adapter(Path(run.out) / "adapter", adapter, Path(cfg.base))
    merged = merge(MergeConfig(run=str(adapter), out=str(out / "merged"), dtype="float32"))
    heldout: DetectionSet = load_coco(held / "annotations.json")
    prompts = {"new": list(shapes), "old": list(OLD)}
    forms = asyncio.run(served_forms(Path(cfg.base), adapter, merged, heldout, prompts, cfg.new_class))
    pictures = asyncio.run(
        compare_pictures(Path(cfg.base), merged, heldout, list(shapes), out / "compare", cfg.pictures)
    )
    report = {
        "recipe": to_json(cfg),
        "train": {**to_json(run), **result, "cpu_count": os.cpu_count()},
        "heldout": {"images": len(heldout.images), "seed": cfg.heldout_seed, "prompts": prompts},
        "forms": forms,
        "pictures": pictures,
    }
    text = json.dumps(report, indent=2) + "\n"
    (out / "report").mkdir(parents=True, exist_ok=True)
    (out / "report" / "report.json").write_text(text)
    (adapter / "report.json").write_text(text)
    write_adapter_card(adapter, report, to_json(TransferConfig()))
    log.info("adapter %s (card README.md), merged %s, report %s", adapter, merged, out / "report")
    return report
