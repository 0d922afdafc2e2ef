"""The demo model and CPU quality benchmark (``make demo-model``, ``python -m finetune demo``).

From nothing to a served detector on a 2-core CPU: build a small random PaliGemma (``demo_config.PRESETS``),
generate synthetic shapes (a 1-4-shape training set, a one-shape set and a held-out set, each with its own
seed), train every weight from scratch (method ``full``: LoRA on a random base would only learn a low-rank
change of noise) through a three-stage curriculum, save the model in the hub layout with a model card,
then evaluate it on the held-out set through the transformers service engine, next to two trivial
baselines (:mod:`finetune.evaluation.metrics`). The shipped result lives in ``models/demo`` (what ``make serve``
serves); this command retrains into ``artifacts/`` and says how to promote the result.

Every stage is bounded by **steps**, never by time: the same command trains the same steps and, with the
same seed and thread count, the same weights on a busy or a quiet machine. Wall time is only reported.
The held-out curve scores snapshots after ``curve_steps``; a snapshot after N steps is exactly what
``--steps N --decay-steps 0`` trains (the recipe's first N steps), which is how the short-run benchmark
is defined.

Why a curriculum (measured, see the README): trained on detection alone, the tiny model learns where the
shapes are but not which shape is which (the label token's loss stays at chance; likely because the label
is one token in six and the boxes' gradient dominates). Shape questions alone (``what shape is the red
one?``) teach it quickly at a lower learning rate. So: (1) shape questions on one-shape images,
(2) detection plus shape questions on one-shape images, (3) detection plus all question types on 1-4
shapes for the remaining steps, its learning rate falling linearly to 0 over its last ``decay_steps``.
The base's ``<locNNNN>`` embeddings start as sinusoids of the bin instead of noise.

Outputs: ``out`` (the model, its ``README.md`` card and ``report.json``) and ``report`` (``report.json``
with every number, ``learning_curve.json``/``.png``, comparison pictures). Cached: if ``out`` already
holds a model, nothing runs unless ``force``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from finetune.config import MergeConfig, TrainConfig
from finetune.data.loaders import load_coco, load_vqa
from finetune.data.records import DetectionSet
from finetune.data.synth import generate_cached
from finetune.options import flag, to_json
from finetune.recipes.demo_config import PRESETS, DemoConfig, Stage, curriculum
from paligemma.checkpoint import build_tiny_checkpoint

log = logging.getLogger(__name__)


"""Model shapes (all run in vLLM's CPU backend: text head_dim 64). ``fine`` has 8-px patches (196 tokens)."""


SHIPPED = Path(__file__).resolve().parents[2] / "models" / "demo"
"""The committed demo model (``make serve``'s default)."""


async def score_heldout(
    model: Path, detection: DetectionSet, vqa: list[Any], out: Path | None, pictures: int
) -> dict[str, Any]:
    """Held-out scores of one model directory through the service's transformers engine."""
    from finetune.evaluation.evaluate import evaluate, open_engine

    async with open_engine(model, "transformers", max_batch_size=64) as engine:
        return await evaluate(engine, detection=detection, vqa=vqa, out=out, pictures=pictures, concurrency=128)


Snapshot = tuple[Path, dict[str, Any]]
"""A model directory and its ``{"step", "seconds"}`` counted from the start of stage 1."""


@dataclass
class Trained:
    """What :func:`train_stages` did: the last run directory, the joined loss curve (steps and seconds
    counted from the start of stage 1), the snapshots and the totals."""

    run: Path
    curve: list[Any]
    snapshots: list[Snapshot]
    steps: int
    seconds: float


def train_stages(cfg: DemoConfig, base: Path, stages: list[Stage], work: Path) -> Trained:
    """Train the stages in turn, each from the previous one's model, each for exactly its steps."""
    from finetune.training.train import train

    model, steps, seconds = base, 0, 0.0
    curve: list[Any] = []
    snapshots: list[Snapshot] = []
    run = work
    for number, stage in enumerate(stages, 1):
        if stage.steps <= 0:
            continue
        run = work / f"run-{number}"
        shutil.rmtree(run, ignore_errors=True)
        marks = tuple(m - steps for m in sorted(cfg.curve_steps) if steps < m <= steps + stage.steps)
        log.info("stage %d/%d: %s, %d steps, lr %g", number, len(stages), stage.name, stage.steps, stage.lr)
        model = train(
            TrainConfig(
                base=str(model),
                out=str(run),
                method="full",
                coco=(str(stage.data / "annotations.json"),) if stage.detection else (),
                vqa=(str(stage.data / "vqa.jsonl"),),
                absent_per_image=cfg.absent_per_image,
                loc_stride=cfg.loc_stride,
                lr=stage.lr,
                warmup_steps=cfg.warmup_steps,
                decay_steps=stage.decay_steps,
                batch_size=cfg.batch_size,
                max_steps=stage.steps,
                threads=cfg.threads,
                seed=cfg.seed,
                logging_steps=10,
                save_steps=10**9,
                precision="fp32",
                snapshot_steps=marks,
            )
        )
        for point in json.loads((run / "learning_curve.json").read_text()):
            curve.append(
                {**point, "step": point["step"] + steps, "seconds": point["seconds"] + seconds, "stage": number}
            )
        done = json.loads((run / "train_result.json").read_text())
        if done["steps"] != stage.steps:
            raise RuntimeError(f"stage {number} trained {done['steps']} of its {stage.steps} steps")
        for mark in marks:
            snap = run / "snapshots" / f"step-{mark}"
            taken = json.loads((snap / "snapshot.json").read_text())
            info = {"step": steps + mark, "seconds": round(seconds + float(taken["seconds"]), 2)}
            snapshots.append((snap, info))
        steps, seconds = steps + int(done["steps"]), seconds + float(done["seconds"])
    return Trained(run, curve, snapshots, steps, seconds)


def _curve_point(report: dict[str, Any], **info: Any) -> dict[str, Any]:
    """One learning-curve point: where it was taken and the held-out headline scores."""
    detection, vqa = report["detection"], report["vqa"]
    return {**info, "map_50": detection["map_50"], "map": detection["map"], "vqa": vqa["accuracy"]}


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Build, train, evaluate; returns the report (also written to ``cfg.report``/report.json and, with the
    model card, into ``cfg.out``)."""
    out, report_dir, work = Path(cfg.out), Path(cfg.report), Path(cfg.work)
    if (out / "model.safetensors").is_file() and not cfg.force:
        log.info("%s already holds the demo model; nothing to do (%s to rebuild)", out, flag("force"))
        cached = report_dir / "report.json"
        return dict(json.loads(cached.read_text())) if cached.is_file() else {}
    if out.resolve() == SHIPPED.resolve():
        log.warning("retraining into the shipped model's folder %s", out)
    import torch

    from finetune.evaluation.metrics import coco_map, majority_answer_baseline, mean_box_baseline, vqa_accuracy
    from finetune.recipes.card import write_card
    from finetune.training.merge import merge
    from finetune.training.plot import learning_curve_png

    torch.set_num_threads(cfg.threads)
    shape = replace(PRESETS[cfg.preset], sinusoid_locs=cfg.sinusoid_locs)
    base = build_tiny_checkpoint(work / "base", seed=cfg.seed, cfg=shape)
    q = cfg.questions_per_image
    train_dir = generate_cached(work / "train", cfg.train_images, cfg.train_seed, questions_per_image=q)
    one_dir = generate_cached(
        work / "one-shape", cfg.one_shape_images, cfg.one_shape_seed,
        questions_per_image=1, max_shapes=1, question_types=("shape",),
    )  # fmt: skip
    held_dir = generate_cached(work / "heldout", cfg.heldout_images, cfg.heldout_seed, questions_per_image=q)
    stages = curriculum(cfg, one_dir, train_dir)
    load_before = os.getloadavg()
    trained = train_stages(cfg, base, stages, work)
    load_after = os.getloadavg()
    merge(MergeConfig(run=str(trained.run), out=str(out), dtype="float32", force=True))

    heldout = load_coco(held_dir / "annotations.json")
    held_vqa = load_vqa(held_dir / "vqa.jsonl")
    final = asyncio.run(score_heldout(out, heldout, held_vqa, report_dir, cfg.pictures))
    curve = []
    for snap, info in trained.snapshots:
        if info["step"] < trained.steps:  # the last step's snapshot is the final model, scored above
            curve.append({**info, "heldout": asyncio.run(score_heldout(snap, heldout, held_vqa, None, 0))})
    curve.append({"step": trained.steps, "seconds": round(trained.seconds, 1), "heldout": final})

    train_set = load_coco(train_dir / "annotations.json")
    train_vqa = load_vqa(train_dir / "vqa.jsonl")
    report = {
        "recipe": to_json(cfg),
        "model_shape": to_json(shape),
        "stages": [to_json(s) for s in stages],
        "training": {
            "steps": trained.steps,
            "seconds": round(trained.seconds, 1),
            "threads": cfg.threads,
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "load_average_before": [round(v, 2) for v in load_before],
            "load_average_after": [round(v, 2) for v in load_after],
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
        },
        "heldout": final,
        "baselines": {
            "mean_box": coco_map(heldout, mean_box_baseline(train_set, heldout)),
            "majority_answer": vqa_accuracy(majority_answer_baseline(train_vqa, held_vqa), held_vqa),
        },
        "curve": curve,
    }
    points = [_curve_point(p["heldout"], step=p["step"], seconds=p["seconds"]) for p in curve]
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "learning_curve.json").write_text(
        json.dumps({"loss": trained.curve, "heldout": points}, indent=1) + "\n"
    )
    learning_curve_png(
        [(p["step"], p["loss"]) for p in trained.curve],
        {
            f"held-out mAP@0.5 ({cfg.heldout_images} images)": [(p["step"], p["map_50"]) for p in points],
            "held-out VQA accuracy": [(p["step"], p["vqa"]) for p in points],
        },
        report_dir / "learning_curve.png",
        title=f"{cfg.preset} PaliGemma from scratch, 3-stage curriculum, {cfg.threads} threads, batch {cfg.batch_size}",
    )
    text = json.dumps(report, indent=2) + "\n"
    (report_dir / "report.json").write_text(text)
    (out / "report.json").write_text(text)
    write_card(out, report, to_json(DemoConfig()))
    detection = final["detection"]
    log.info(
        "demo: mAP@0.5 %.3f, mAP %.3f, VQA %.3f after %d steps (%.1f min)",
        detection["map_50"],
        detection["map"],
        final["vqa"]["accuracy"],
        trained.steps,
        trained.seconds / 60,
    )
    if out.resolve() != SHIPPED.resolve():
        log.info("to ship this model as make serve's default: rm -r models/demo && cp -r %s models/demo", out)
    return report
