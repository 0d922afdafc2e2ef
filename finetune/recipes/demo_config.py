"""The demo recipe's knobs and its curriculum (``python -m finetune demo``; see :mod:`finetune.recipes.demo`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from finetune.options import flag
from paligemma.checkpoint import TinyConfig

log = logging.getLogger(__name__)


PRESETS: dict[str, TinyConfig] = {
    "tiny": TinyConfig(),
    "small": TinyConfig(vision_layers=4, vision_hidden=192, vision_heads=3, text_layers=4),
    "medium": TinyConfig(
        vision_layers=4,
        vision_hidden=256,
        vision_heads=4,
        text_layers=4,
        text_hidden=256,
        text_heads=4,
        intermediate=512,
    ),
    "fine": TinyConfig(patch_size=8),
}


@dataclass
class DemoConfig:
    """The benchmark's knobs; the defaults are the recipe of the shipped model (``models/demo``)."""

    out: str = "artifacts/demo-model"
    """The trained model, in the hub layout, with README.md (model card) and report.json."""
    report: str = "artifacts/demo-report"
    """report.json, learning_curve.json/.png, pictures/."""
    work: str = "artifacts/demo-work"
    """Base model, synthetic data, training runs and snapshots."""
    preset: Literal["tiny", "small", "medium", "fine"] = "tiny"
    """Model shape (see finetune.recipes.demo.PRESETS)."""
    sinusoid_locs: bool = True
    """Start the base's <locNNNN> embeddings as sinusoids of the bin, not noise (see
    paligemma.checkpoint.TinyConfig)."""
    train_images: int = 20000
    """Synthetic training images with 1-4 shapes (seed --train-seed)."""
    one_shape_images: int = 6000
    """Synthetic one-shape images for curriculum stages 1 and 2 (seed --one-shape-seed)."""
    questions_per_image: int = 1
    """VQA questions per synthetic image (train and held-out)."""
    heldout_images: int = 200
    """Held-out images (seed --heldout-seed), never seen in training."""
    train_seed: int = 1
    """Seed of the training set."""
    one_shape_seed: int = 3
    """Seed of the one-shape set."""
    heldout_seed: int = 2
    """Seed of the held-out set."""
    steps: int = 16000
    """Optimiser steps of all training; stage 3 trains what stages 1 and 2 leave."""
    shape_steps: int = 600
    """Stage 1: shape questions only, on one-shape images."""
    one_shape_steps: int = 1000
    """Stage 2: detection and shape questions on one-shape images."""
    shape_lr: float = 3e-4
    """Learning rate of stage 1 (at 1e-3 the shape answer stays at chance)."""
    lr: float = 1e-3
    """Learning rate of stages 2 and 3 (AdamW, constant after warm-up)."""
    decay_steps: int = 4000
    """Stage 3's last steps, over which its learning rate falls linearly to 0 (0: no decay, so the model
    is the longer recipe's snapshot after --steps)."""
    warmup_steps: int = 20
    """Linear warm-up steps at the start of each stage."""
    threads: int = 2
    """CPU threads for training and evaluation (the result depends on it, not on the machine's load)."""
    batch_size: int = 32
    """Examples per step."""
    absent_per_image: int = 3
    """Absent classes added to each detection prompt (3: every prompt lists all three shapes)."""
    loc_stride: int = 1
    """Round box targets to every Nth loc bin (see finetune.data); 1 keeps big_vision's exact bins."""
    curve_steps: tuple[int, ...] = (1200, 2400, 3600, 6000, 9000, 12000)
    """Steps after which a snapshot is scored on the whole held-out set (the learning curve); 3600 is
    the short-run benchmark (about 10 minutes on 2 quiet cores)."""
    pictures: int = 12
    """Comparison pictures of the first held-out images."""
    seed: int = 0
    """Seed of the base model's initialisation and of training."""
    force: bool = False
    """Run even if --out already holds a model."""

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"{flag('preset')} must be one of {', '.join(PRESETS)}")
        if self.heldout_seed in (self.train_seed, self.one_shape_seed):
            raise ValueError(f"{flag('heldout_seed')} must differ from the training seeds")
        if min(self.train_images, self.one_shape_images, self.heldout_images) < 1:
            raise ValueError(
                f"{flag('train_images')}, {flag('one_shape_images')}, {flag('heldout_images')} must be >= 1"
            )
        last = self.steps - self.shape_steps - self.one_shape_steps
        if min(self.shape_steps, self.one_shape_steps, self.decay_steps) < 0 or last < max(
            1, self.warmup_steps + self.decay_steps
        ):
            raise ValueError(
                f"{flag('shape_steps')} + {flag('one_shape_steps')} must leave {flag('steps')} for stage 3's"
                f" {flag('warmup_steps')} and {flag('decay_steps')}"
            )
        if any(not 0 < step <= self.steps for step in self.curve_steps):
            raise ValueError(f"{flag('curve_steps')} must lie in 1..{flag('steps')}")


@dataclass(frozen=True)
class Stage:
    """One curriculum stage: a synthetic set (its questions always, its boxes if ``detection``), for how
    many steps, at which rate."""

    name: str
    data: Path
    detection: bool
    steps: int
    lr: float
    decay_steps: int = 0


def curriculum(cfg: DemoConfig, one_shape: Path, train_set: Path) -> list[Stage]:
    """The three stages (module docstring); stage 3 trains what is left of ``steps``."""
    rest = cfg.steps - cfg.shape_steps - cfg.one_shape_steps
    return [
        Stage("shape questions", one_shape, False, cfg.shape_steps, cfg.shape_lr),
        Stage("one shape", one_shape, True, cfg.one_shape_steps, cfg.lr),
        Stage("1-4 shapes", train_set, True, rest, cfg.lr, cfg.decay_steps),
    ]
