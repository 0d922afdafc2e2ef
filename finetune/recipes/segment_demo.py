"""Teach the shipped demo model to segment (``make demo-segment``, ``python -m finetune segment-demo``).

The path a user takes to finetune PaliGemma for segmentation, on the CPU: COCO instance masks (here the
synthetic shapes with ``masks``: each annotation's drawn pixels as RLE) become ``segment`` examples whose
targets are the box's 4 ``<loc>`` and the mask's 16 ``<seg>`` tokens from the VQ-VAE's encoder
(``models/shapes-vae``, the stand-in for Google's ``vae-oid.npz``); ``models/demo`` is finetuned on them, and
the result is served by both engines.

Why a full finetune and not LoRA: the demo model never saw a ``<seg>`` token, so their (tied) embeddings are
still random, and LoRA on the language model cannot change them. On 4,000 of these images, a 3,000-step LoRA
run (rank 32, lr 1e-3) reached a mean mask IoU of 0.560 and cost ``detect`` 0.15 mAP@0.5; the full run is in
the card. A released PaliGemma was pretrained on ``<seg>`` tokens: there LoRA (``train --segment-coco``) is the path.

Training mixes ``segment`` and ``detect`` prompts on the same images, so the model keeps detecting, and both ask
one class per prompt (``prompt_style`` and ``segment_prompt_style`` ``"per_class"``; big_vision's segmentation
data asks one object per prompt too); it is scored so. Why one class: the tiny model loses its boxes after a few
20-token objects. Asked all three classes at once (trained so, 3,000 steps), its boxes' IoU fell from 0.87 for the
first object to 0.27 for the fourth, and the mean mask IoU was 0.564. Why for ``detect`` too: with one-class
``segment`` prompts beside all-class ``detect`` prompts (4,000 steps), the model segmented whichever object came
first, whatever class was asked (mean mask IoU 0.08).

Held-out figures (images of their own seed, never trained on): mean mask IoU with the ground truth and mask mAP
(:mod:`finetune.evaluation.mask_metrics`) for the base and the finetuned model on each engine, how many
answers the two engines give token for token alike, and the ``detect`` mAP before and after. Training is bounded
by steps (cached in ``work`` while its config is unchanged); wall time is only reported.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.config import MergeConfig, TrainConfig
from finetune.data.records import DetectionSet
from finetune.data.synth import DEFAULT_SHAPES, generate_cached
from finetune.options import to_json
from finetune.recipes.transfer import train_cached

log = logging.getLogger(__name__)
FORMS = ("base (transformers)", "finetuned (transformers)", "finetuned (vLLM)")


@dataclass
class SegmentDemoConfig:
    """The recipe's knobs; the defaults made the shipped model (``models/demo-segment``)."""

    base: str = "models/demo"
    """The model to finetune (hub layout)."""
    segmentation_weights: str = "models/shapes-vae/vae-shapes.npz"
    """The mask VQ-VAE: its encoder makes the training targets, its decoder the served masks."""
    model: str = "artifacts/demo-segment/model"
    """Where the finetuned float32 checkpoint goes, with its card (README.md) and report.json
    (``--model models/demo-segment`` writes the shipped one)."""
    out: str = "artifacts/demo-segment"
    """report/report.json and pictures/ (ground truth | base | finetuned)."""
    work: str = "artifacts/demo-segment-work"
    """Synthetic data and the training run."""
    train_images: int = 20000
    """Training images (1-4 shapes each, masks included), each asked 'segment <class>' and 'detect <class>' per
    class present and for one absent class (seed --train-seed)."""
    heldout_images: int = 200
    """Held-out images (seed --heldout-seed)."""
    train_seed: int = 21
    heldout_seed: int = 23
    lr: float = 3e-4
    """Peak learning rate (every weight is trained)."""
    steps: int = 4000
    """Optimiser steps (batch --batch-size)."""
    decay_steps: int = 1333
    """The last steps, over which the learning rate falls linearly to 0."""
    warmup_steps: int = 100
    batch_size: int = 32
    threads: int = 1
    """CPU threads for training (the weights depend on it, not on the machine's load). One: two threads on
    two shared cores slow to a crawl whenever another process runs (OpenMP threads wait on each other)."""
    seed: int = 0
    pictures: int = 8
    """Before/after pictures (ground truth, base, finetuned), masks overlaid."""
    force: bool = False
    """Train again even if --work holds this run."""

    def __post_init__(self) -> None:
        if self.train_seed == self.heldout_seed:
            raise ValueError("--train-seed and --heldout-seed must differ: held-out images are never trained on")


def train_config(cfg: SegmentDemoConfig, data: Path) -> TrainConfig:
    """The full run: every weight (the new ``<seg>`` embeddings too); per image, a ``segment <class>`` and a
    ``detect <class>`` prompt per class present and for one absent class."""
    annotations = str(data / "annotations.json")
    return TrainConfig(
        base=cfg.base,
        out=str(Path(cfg.work) / "run"),
        method="full",
        coco=(annotations,),
        segment_coco=(annotations,),
        segmentation_weights=cfg.segmentation_weights,
        prompt_style="per_class",
        segment_prompt_style="per_class",
        absent_per_image=1,
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


def training_data(cfg: SegmentDemoConfig) -> tuple[Path, Path]:
    """The training and held-out sets (cached by their arguments)."""
    work = Path(cfg.work)
    train = generate_cached(work / "train", cfg.train_images, cfg.train_seed, masks=True)
    held = generate_cached(work / "heldout", cfg.heldout_images, cfg.heldout_seed, masks=True)
    return train, held


async def served_scores(
    cfg: SegmentDemoConfig, finetuned: Path, held: Path, pictures: Path | None = None
) -> dict[str, Any]:
    """Each form's mask and box scores on the held-out set, and how many answers the engines share; with
    ``pictures``, the first ``cfg.pictures`` images as ground truth | base | finetuned (vLLM), and a sheet.
    Each model is asked as it was trained: the base all classes in one prompt, the finetuned one class each."""
    from finetune.data.segments import load_coco_segments
    from finetune.evaluation.evaluate import answers_to_boxes, detection_answers, open_engine
    from finetune.evaluation.mask_metrics import PredictedMask, mask_scores
    from finetune.evaluation.metrics import coco_map
    from finetune.evaluation.segments import predict_masks
    from paligemma.segmentation import MaskDecoder

    heldout = load_coco_segments(held / "annotations.json")
    decoder = MaskDecoder.from_npz(cfg.segmentation_weights)
    classes = list(DEFAULT_SHAPES)
    engines = [(Path(cfg.base), "transformers"), (finetuned, "transformers"), (finetuned, "vllm")]
    models = dict(zip(FORMS, engines, strict=True))
    forms: dict[str, Any] = {}
    panels: dict[str, dict[int, list[PredictedMask]]] = {}
    texts: dict[str, list[str]] = {}
    for form, (model, engine_name) in models.items():
        per_prompt = 0 if form == FORMS[0] else 1
        async with open_engine(model, engine_name) as engine:  # type: ignore[arg-type]
            predictions, texts[form] = await predict_masks(
                engine, heldout, classes, decoder, classes_per_prompt=per_prompt, concurrency=128
            )
            panels[form] = predictions
            answers = await detection_answers(engine, heldout, classes, classes_per_prompt=per_prompt, concurrency=128)
            boxes = coco_map(heldout, answers_to_boxes(answers, heldout, engine.tokenizer()))
            forms[form] = {**mask_scores(heldout, predictions, classes), "detect_map_50": boxes["map_50"]}
    same = sum(a == b for a, b in zip(texts[FORMS[1]], texts[FORMS[2]], strict=True))  # per prompt
    if pictures is not None:
        before_after(heldout, {form: panels[form] for form in (FORMS[0], FORMS[2])}, pictures, cfg.pictures)
    prompts = len(texts[FORMS[1]])
    return {
        "images": len(heldout.images),
        "prompts": prompts,
        "seed": cfg.heldout_seed,
        "forms": forms,
        "same_text_engines": same,
    }


def before_after(heldout: DetectionSet, panels: dict[str, Any], out: Path, count: int) -> None:
    """``out/NNN.png``: ground truth, then each panel's masks, for the first ``count`` images; ``out/sheet.png``
    stacks the first two."""
    from finetune.data.images import load_training_image
    from finetune.evaluation.mask_metrics import truth_masks
    from finetune.evaluation.segments import segment_picture
    from paligemma.draw import contact_sheet

    out.mkdir(parents=True, exist_ok=True)
    drawn = []
    for i, image in enumerate(heldout.images[:count]):
        by_form = {form: preds[image.image_id] for form, preds in panels.items()}
        picture = segment_picture(load_training_image(image.path), truth_masks(image, DEFAULT_SHAPES), by_form)
        picture.save(out / f"{i:03d}.png")
        drawn.append(picture)
    if drawn:
        contact_sheet(drawn[:2], columns=1).save(out / "sheet.png")


def scores_markdown(heldout: dict[str, Any]) -> str:
    """The held-out table: one row per served form."""
    classes = list(DEFAULT_SHAPES)
    lines = [
        f"| served as | mean mask IoU | {' | '.join(classes)} | mask AP@0.5 | mask AP@[.5:.95] | detect mAP@0.5 |",
        "|---|---|" + "---|" * len(classes) + "---|---|---|",
    ]
    for form, score in heldout["forms"].items():
        per_class = " | ".join(f"{score['per_class'][c]['mean_iou']:.3f}" for c in classes)
        lines.append(
            f"| {form} | **{score['mean_iou']:.3f}** | {per_class} | {score['mask_map50']:.3f} | "
            f"{score['mask_map']:.3f} | {score['detect_map_50']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def card_text(report: dict[str, Any], date: str) -> str:
    """The model's card: what it learned, how it was made, the held-out table."""
    recipe, run, heldout = report["recipe"], report["train"], report["heldout"]
    weights = recipe["segmentation_weights"]
    return f"""# The demo model, finetuned to segment

`{recipe["base"]}` (circles, squares, triangles) finetuned to answer `segment circle` (one class per request, as
big_vision's segmentation data asks one object per prompt; `detect circle` too): per object 4 `<loc>` and 16
`<seg>` tokens, whose masks the VQ-VAE `{weights}` decodes (its encoder made the targets). `detect` is trained on
the same images, so it is kept. Every weight is trained: the base never saw a
`<seg>` token, so their embeddings were random, and LoRA cannot reach them (`finetune/recipes/segment_demo.py`).

Made by `python -m finetune segment-demo` (`make demo-segment`) on {date} ({run["threads"]} thread,
{run["cpu_count"]} cores): {run["steps"]:,} steps of batch {run["batch_size"]} in {run["seconds"] / 60:.1f} min,
learning rate {run["lr"]:g} (warm-up {run["warmup_steps"]}, linear decay over the last {run["decay_steps"]:,}),
on {recipe["train_images"]:,} synthetic images with 1-4 shapes (seed {recipe["train_seed"]}), each asked
`segment <class>` and `detect <class>` for each class present and for one absent class. Bounded by steps, never
by time.

Held-out: {heldout["images"]} images (seed {recipe["heldout_seed"]}), never trained on, asked `segment circle`,
`segment square` and `segment triangle` as `/segment` asks (constrained decoding, masks decoded and pasted as the
service does); detect mAP@0.5 from `detect circle`, `detect square` and `detect triangle`. The base is asked as it
was trained, all three classes in one prompt. Mean mask IoU: each ground-truth object matched one to one to a
predicted mask of its class, a missed object counting 0 (`finetune/evaluation/mask_metrics.py`); mask AP from
pycocotools `segm`. Both engines gave the same text for {heldout["same_text_engines"]}/{heldout["prompts"]}
segment prompts.

{scores_markdown(heldout)}
Serve it: `python -m service --model models/demo-segment --segmentation-weights {weights}`, then ask one class
per request: `curl -F image=@shapes.png -F objects=circle localhost:8000/segment`.
Every number here is in `report.json` beside this file.
"""


def run_segment_demo(cfg: SegmentDemoConfig) -> dict[str, Any]:
    """Data, training, the float32 checkpoint, held-out scores on both engines, pictures; returns the report."""
    from finetune.training.merge import merge
    from finetune.training.train import train_record

    out = Path(cfg.out)
    train, held = training_data(cfg)
    run = train_config(cfg, train)
    result = train_cached(run, cfg.force)
    model = merge(MergeConfig(run=run.out, out=cfg.model, dtype="float32"))
    heldout = asyncio.run(served_scores(cfg, model, held, out / "pictures"))
    report = {
        "recipe": to_json(cfg),
        "train": {**train_record(run), "base": run.base, **result, "cpu_count": os.cpu_count()},
        "heldout": heldout,
    }
    text = json.dumps(report, indent=2) + "\n"
    (out / "report").mkdir(parents=True, exist_ok=True)
    (out / "report" / "report.json").write_text(text)
    (model / "report.json").write_text(text)
    (model / "README.md").write_text(card_text(report, datetime.date.today().isoformat()))
    log.info("model %s (card README.md), report %s, pictures %s", model, out / "report", out / "pictures")
    return report
