"""The CPU quality benchmark and demo model (``make demo-model``, ``python -m finetune demo``).

From nothing to a served detector on a 2-core CPU: build a small random PaliGemma (:data:`PRESETS`),
generate a synthetic shapes training set and a held-out set with another seed, train every weight from
scratch (method ``full``: LoRA on a random base would only learn a low-rank change of noise) for a fixed
step count with a wall-clock cap, save the model in the hub layout, then evaluate it on the held-out set
through the transformers service engine, next to two trivial baselines (:mod:`finetune.metrics`).

Outputs: ``out`` (the model the service loads) and ``report`` (``report.json`` with every number,
``learning_curve.json``/``.png`` with the loss per step and held-out scores at snapshot minutes, and
comparison pictures). Cached: if ``out`` already holds a model, nothing runs unless ``force``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from finetune.config import MergeConfig, TrainConfig, flag, to_json
from finetune.data import DetectionSet, load_coco, load_vqa
from paligemma.checkpoint import TinyConfig, build_tiny_checkpoint

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
"""Model shapes (all run in vLLM's CPU backend: text head_dim 64). ``fine`` has 8-px patches (196 tokens)."""


@dataclass
class DemoConfig:
    """The benchmark's knobs; the defaults are the committed recipe."""

    out: str = "artifacts/demo-model"
    """The trained model, in the hub layout (what `make serve` serves)."""
    report: str = "artifacts/demo-report"
    """report.json, learning_curve.json/.png, pictures/."""
    work: str = "artifacts/demo-work"
    """Base model, synthetic data, training checkpoints and snapshots."""
    preset: Literal["tiny", "small", "medium", "fine"] = "tiny"
    """Model shape (see finetune.demo.PRESETS)."""
    train_images: int = 6000
    """Synthetic training images (seed --train-seed)."""
    questions_per_image: int = 1
    """VQA questions per synthetic image (train and held-out)."""
    heldout_images: int = 200
    """Held-out images (seed --heldout-seed), never seen in training."""
    train_seed: int = 1
    """Seed of the training set."""
    heldout_seed: int = 2
    """Seed of the held-out set."""
    max_steps: int = 3000
    """Optimiser steps (sized to fit --max-minutes on a quiet 2-core machine)."""
    max_minutes: float = 10.0
    """Wall-clock cap on training; a slower or busier machine stops early."""
    threads: int = 2
    """CPU threads for training and evaluation."""
    batch_size: int = 32
    """Examples per step."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    scheduler: str = "constant_with_warmup"
    """Learning-rate schedule over --max-steps."""
    warmup_steps: int = 50
    """Linear warm-up steps."""
    absent_per_image: int = 1
    """Absent-class prompts (empty target) per training image."""
    loc_stride: int = 16
    """Box targets on every 16th loc bin (see finetune.data): sharper first-token choice for a tiny model."""
    curve_minutes: tuple[float, ...] = (2.5, 5.0, 7.5)
    """Training minutes at which a snapshot is scored on --curve-images held-out images."""
    curve_images: int = 100
    """Held-out images (and their questions) scored per snapshot."""
    pictures: int = 12
    """Comparison pictures of the first held-out images."""
    seed: int = 0
    """Seed of the base model's initialisation and of training."""
    force: bool = False
    """Run even if --out already holds a model."""

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"{flag('preset')} must be one of {', '.join(PRESETS)}")
        if self.heldout_seed == self.train_seed:
            raise ValueError(f"{flag('heldout_seed')} must differ from {flag('train_seed')}")
        if min(self.train_images, self.heldout_images, self.max_steps) < 1:
            raise ValueError(f"{flag('train_images')}, {flag('heldout_images')} and {flag('max_steps')} must be >= 1")


def _dataset(path: Path, n: int, seed: int, questions: int) -> Path:
    """Synthetic set at ``path``, regenerated only when its recipe changed."""
    from finetune.synth import generate

    stamp = path / "synth.json"
    wanted = {"n": n, "seed": seed, "questions_per_image": questions}
    if not (stamp.is_file() and json.loads(stamp.read_text()) == wanted):
        shutil.rmtree(path, ignore_errors=True)
        generate(path, n, seed=seed, questions_per_image=questions)
        stamp.write_text(json.dumps(wanted) + "\n")
    return path


async def _score(
    model: Path, detection: DetectionSet, vqa: list[Any], out: Path | None, pictures: int
) -> dict[str, Any]:
    """Held-out scores of one model directory through the service's transformers engine."""
    from finetune.evaluate import evaluate, open_engine

    async with open_engine(model, "transformers", max_batch_size=64) as engine:
        return await evaluate(engine, detection=detection, vqa=vqa, out=out, pictures=pictures, concurrency=128)


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Build, train, evaluate; returns the report (also written to ``cfg.report``/report.json)."""
    out, report_dir, work = Path(cfg.out), Path(cfg.report), Path(cfg.work)
    if (out / "model.safetensors").is_file() and not cfg.force:
        log.info("%s already holds the demo model; nothing to do (%s to rebuild)", out, flag("force"))
        cached = report_dir / "report.json"
        return dict(json.loads(cached.read_text())) if cached.is_file() else {}
    import torch

    from finetune.merge import merge
    from finetune.metrics import coco_map, majority_answer_baseline, mean_box_baseline, vqa_accuracy
    from finetune.plot import learning_curve_png
    from finetune.train import train

    torch.set_num_threads(cfg.threads)
    base = build_tiny_checkpoint(work / "base", seed=cfg.seed, cfg=PRESETS[cfg.preset])
    train_dir = _dataset(work / "train", cfg.train_images, cfg.train_seed, cfg.questions_per_image)
    held_dir = _dataset(work / "heldout", cfg.heldout_images, cfg.heldout_seed, cfg.questions_per_image)
    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    load_before = os.getloadavg()
    started = time.monotonic()
    train(
        TrainConfig(
            base=str(base),
            out=str(run),
            method="full",
            coco=(str(train_dir / "annotations.json"),),
            vqa=(str(train_dir / "vqa.jsonl"),),
            absent_per_image=cfg.absent_per_image,
            lr=cfg.lr,
            loc_stride=cfg.loc_stride,
            scheduler=cfg.scheduler,
            warmup_steps=cfg.warmup_steps,
            batch_size=cfg.batch_size,
            max_steps=cfg.max_steps,
            max_minutes=cfg.max_minutes,
            threads=cfg.threads,
            seed=cfg.seed,
            logging_steps=10,
            save_steps=10**9,
            precision="fp32",
            snapshot_minutes=cfg.curve_minutes,
        )
    )
    train_seconds = time.monotonic() - started
    load_after = os.getloadavg()
    merge(MergeConfig(run=str(run), out=str(out), dtype="float32", force=True))

    heldout = load_coco(held_dir / "annotations.json")
    held_vqa = load_vqa(held_dir / "vqa.jsonl")
    final = asyncio.run(_score(out, heldout, held_vqa, report_dir, cfg.pictures))
    curve_file = run / "learning_curve.json"
    curve = json.loads(curve_file.read_text()) if curve_file.is_file() else []
    steps = int(json.loads((run / "train_result.json").read_text())["steps"])
    subset = DetectionSet(heldout.images[: cfg.curve_images], heldout.classes)
    sub_ids = {im.path for im in subset.images}
    sub_vqa = [r for r in held_vqa if r.image in sub_ids]
    points = []
    for snap in sorted((run / "snapshots").glob("minute-*"), key=lambda p: float(p.name.split("-")[1])):
        info = json.loads((snap / "snapshot.json").read_text())
        scores = asyncio.run(_score(snap, subset, sub_vqa, None, 0))
        points.append({**info, "map_50": scores["detection"]["map_50"], "vqa": scores["vqa"]["accuracy"]})
    last = {"step": steps, "seconds": round(train_seconds, 1)}
    final_sub = asyncio.run(_score(out, subset, sub_vqa, None, 0))
    points.append({**last, "map_50": final_sub["detection"]["map_50"], "vqa": final_sub["vqa"]["accuracy"]})

    train_set = load_coco(train_dir / "annotations.json")
    train_vqa = load_vqa(train_dir / "vqa.jsonl")
    report = {
        "recipe": to_json(cfg),
        "model_shape": to_json(PRESETS[cfg.preset]),
        "training": {
            "steps": steps,
            "seconds": round(train_seconds, 1),
            "threads": cfg.threads,
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "load_average_before": [round(v, 2) for v in load_before],
            "load_average_after": [round(v, 2) for v in load_after],
            "cpu_count": os.cpu_count(),
        },
        "heldout": final,
        "baselines": {
            "mean_box": coco_map(heldout, mean_box_baseline(train_set, heldout)),
            "majority_answer": vqa_accuracy(majority_answer_baseline(train_vqa, held_vqa), held_vqa),
        },
        "curve": points,
    }
    (report_dir / "learning_curve.json").write_text(json.dumps({"loss": curve, "heldout": points}, indent=1) + "\n")
    learning_curve_png(
        [(p["step"], p["loss"]) for p in curve],
        {
            f"held-out mAP@0.5 ({cfg.curve_images} images)": [(p["step"], p["map_50"]) for p in points],
            "held-out VQA accuracy": [(p["step"], p["vqa"]) for p in points],
        },
        report_dir / "learning_curve.png",
        title=f"{cfg.preset} PaliGemma from scratch, {cfg.threads} threads, batch {cfg.batch_size}",
    )
    (report_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info(
        "demo: mAP@0.5 %.3f, mAP %.3f, VQA %.3f after %d steps",
        final["detection"]["map_50"],
        final["detection"]["map"],
        final["vqa"]["accuracy"],
        steps,
    )
    return report
