"""Teach the shipped demo model to segment with LoRA (``make demo-segment``, ``python -m finetune segment-demo``).

The path a user takes to finetune a real PaliGemma for segmentation, on the CPU: COCO instance masks (here the
synthetic shapes with ``masks``: each annotation's drawn pixels as RLE) become ``segment`` examples whose
targets are the box's 4 ``<loc>`` and the mask's 16 ``<seg>`` tokens from the VQ-VAE's encoder
(``models/shapes-vae``, the stand-in for Google's ``vae-oid.npz``); a LoRA adapter on the language model
learns them from ``models/demo``, is merged, and the merged checkpoint is served by both engines.

Training mixes ``segment`` and ``detect`` prompts on the same images (one of each per image), so the model keeps
detecting. Held-out figures (images of their own seed, never trained on): mean mask IoU with the ground truth
and mask mAP (:mod:`finetune.segment_eval`) for the base and the merged model on each engine, how many answers
the two engines give token for token alike, and the ``detect`` mAP before and after. Training is bounded by
steps (cached in ``work`` while its config is unchanged); wall time is only reported.
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

from finetune.config import MergeConfig, TrainConfig, to_json
from finetune.data import DetectionSet
from finetune.synth import DEFAULT_SHAPES, generate_cached
from finetune.transfer import ship_adapter, train_cached

log = logging.getLogger(__name__)
FORMS = ("base (transformers)", "merged (transformers)", "merged (vLLM)")


@dataclass
class SegmentDemoConfig:
    """The recipe's knobs; the defaults made the shipped adapter (``models/demo-segment``)."""

    base: str = "models/demo"
    """The model to adapt (hub layout)."""
    segmentation_weights: str = "models/shapes-vae/vae-shapes.npz"
    """The mask VQ-VAE: its encoder makes the training targets, its decoder the served masks."""
    adapter: str = "artifacts/demo-segment/adapter"
    """Where the adapter goes, with its card (README.md) and report.json; its base is recorded relative to it."""
    out: str = "artifacts/demo-segment"
    """merged/ (the merged float32 checkpoint), report/report.json and pictures/."""
    work: str = "artifacts/demo-segment-work"
    """Synthetic data and the training run."""
    train_images: int = 4000
    """Training images (1-4 shapes each, masks included), each asked 'segment' and 'detect' (seed --train-seed)."""
    heldout_images: int = 200
    """Held-out images (seed --heldout-seed)."""
    train_seed: int = 21
    heldout_seed: int = 23
    lora_r: int = 32
    """LoRA rank (the text model is 128 wide)."""
    lora_alpha: int = 64
    """LoRA scale numerator (scale alpha / r = 2)."""
    lr: float = 1e-3
    """Peak learning rate."""
    steps: int = 3000
    """Optimiser steps (batch --batch-size)."""
    decay_steps: int = 1000
    """The last steps, over which the learning rate falls linearly to 0."""
    warmup_steps: int = 100
    batch_size: int = 32
    threads: int = 1
    """CPU threads for training (the weights depend on it, not on the machine's load). One: two threads on
    two shared cores slow to a crawl whenever another process runs (OpenMP threads wait on each other)."""
    seed: int = 0
    pictures: int = 8
    """Before/after pictures (base left, merged right), masks overlaid."""
    force: bool = False
    """Train again even if --work holds this run."""

    def __post_init__(self) -> None:
        if self.train_seed == self.heldout_seed:
            raise ValueError("--train-seed and --heldout-seed must differ: held-out images are never trained on")


def train_config(cfg: SegmentDemoConfig, data: Path) -> TrainConfig:
    """The LoRA run: language model only (TrainConfig's default targets), one segment and one detect prompt per
    image, each listing the classes present plus one absent."""
    annotations = str(data / "annotations.json")
    return TrainConfig(
        base=cfg.base,
        out=str(Path(cfg.work) / "run"),
        method="lora",
        coco=(annotations,),
        segment_coco=(annotations,),
        segmentation_weights=cfg.segmentation_weights,
        absent_per_image=1,
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


def training_data(cfg: SegmentDemoConfig) -> tuple[Path, Path]:
    """The training and held-out sets (cached by their arguments)."""
    work = Path(cfg.work)
    train = generate_cached(work / "train", cfg.train_images, cfg.train_seed, masks=True)
    held = generate_cached(work / "heldout", cfg.heldout_images, cfg.heldout_seed, masks=True)
    return train, held


async def served_scores(
    cfg: SegmentDemoConfig, merged: Path, held: Path, pictures: Path | None = None
) -> dict[str, Any]:
    """Each form's mask and box scores on the held-out set, and how many answers the engines share; with
    ``pictures``, the first ``cfg.pictures`` images as ground truth | base | merged (vLLM), and a sheet."""
    from finetune.evaluate import answers_to_boxes, detection_answers, open_engine
    from finetune.metrics import coco_map
    from finetune.segment_data import load_coco_segments
    from finetune.segment_eval import PredictedMask, mask_scores, predict_masks
    from paligemma.segmentation import MaskDecoder

    heldout = load_coco_segments(held / "annotations.json")
    decoder = MaskDecoder.from_npz(cfg.segmentation_weights)
    classes = list(DEFAULT_SHAPES)
    models = {
        "base (transformers)": (Path(cfg.base), "transformers"),
        "merged (transformers)": (merged, "transformers"),
    }
    models["merged (vLLM)"] = (merged, "vllm")
    forms: dict[str, Any] = {}
    panels: dict[str, dict[int, list[PredictedMask]]] = {}
    texts: dict[str, list[str]] = {}
    for form, (model, engine_name) in models.items():
        async with open_engine(model, engine_name) as engine:  # type: ignore[arg-type]
            predictions, texts[form] = await predict_masks(engine, heldout, classes, decoder, concurrency=128)
            panels[form] = predictions
            answers = await detection_answers(engine, heldout, classes, concurrency=128)
            boxes = coco_map(heldout, answers_to_boxes(answers, heldout, engine.tokenizer()))
            forms[form] = {**mask_scores(heldout, predictions, classes), "detect_map_50": boxes["map_50"]}
    same = sum(a == b for a, b in zip(texts["merged (transformers)"], texts["merged (vLLM)"], strict=True))
    if pictures is not None:
        before_after(heldout, {form: panels[form] for form in (FORMS[0], FORMS[2])}, pictures, cfg.pictures)
    return {"images": len(heldout.images), "seed": cfg.heldout_seed, "forms": forms, "same_text_engines": same}


def before_after(heldout: DetectionSet, panels: dict[str, Any], out: Path, count: int) -> None:
    """``out/NNN.png``: ground truth, then each panel's masks, for the first ``count`` images; ``out/sheet.png``
    stacks the first four."""
    from finetune.images import load_training_image
    from finetune.segment_eval import segment_picture, truth_masks
    from paligemma.draw import contact_sheet

    out.mkdir(parents=True, exist_ok=True)
    drawn = []
    for i, image in enumerate(heldout.images[:count]):
        by_form = {form: preds[image.image_id] for form, preds in panels.items()}
        picture = segment_picture(load_training_image(image.path), truth_masks(image, DEFAULT_SHAPES), by_form)
        picture.save(out / f"{i:03d}.png")
        drawn.append(picture)
    if drawn:
        contact_sheet(drawn[:4], columns=1).save(out / "sheet.png")


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
    """The adapter's card: what it teaches, how it was made, the held-out table."""
    recipe, run, heldout = report["recipe"], report["train"], report["heldout"]
    return f"""# LoRA adapter: the demo model learns to segment

A LoRA adapter (rank {run["lora_r"]}, alpha {run["lora_alpha"]}, language model only: {", ".join(run["lora_targets"])})
for the demo model (`{recipe["base"]}`, recorded relative to this folder in `adapter_config.json`). It teaches
`segment circle ; square ; triangle`: per object 4 `<loc>` and 16 `<seg>` tokens, whose masks the VQ-VAE
`{recipe["segmentation_weights"]}` decodes (its encoder made the targets). `detect` is trained on the same
images, so it is kept.

Made by `python -m finetune segment-demo` (`make demo-segment`) on {date} ({run["threads"]} thread(s),
{run["cpu_count"]} cores): {run["steps"]:,} steps of batch {run["batch_size"]} in {run["seconds"] / 60:.1f} min,
learning rate {run["lr"]:g} (warm-up {run["warmup_steps"]}, linear decay over the last {run["decay_steps"]:,}),
on {recipe["train_images"]:,} synthetic images with 1-4 shapes (seed {recipe["train_seed"]}), each asked one
`segment` and one `detect` prompt. Bounded by steps, never by time.

Held-out: {heldout["images"]} images (seed {recipe["heldout_seed"]}), never trained on, asked
`segment circle ; square ; triangle` through the engines `/segment` uses (constrained decoding, masks decoded
and pasted as the service does). Mean mask IoU: each ground-truth object matched one to one to a predicted
mask of its class, a missed object counting 0 (`finetune/segment_eval.py`); mask AP from pycocotools `segm`.
The merged checkpoint gave the same text on both engines for {heldout["same_text_engines"]}/{heldout["images"]}
images.

{scores_markdown(heldout)}
Serve it: `python -m finetune merge --run models/demo-segment --out artifacts/demo-segment-merged --dtype float32`,
then `python -m service --model artifacts/demo-segment-merged --segmentation-weights {recipe["segmentation_weights"]}`.
Every number here is in `report.json` beside this file.
"""


def run_segment_demo(cfg: SegmentDemoConfig) -> dict[str, Any]:
    """Data, LoRA training, merge, held-out scores on both engines, pictures; returns the report."""
    from finetune.merge import merge

    out, adapter = Path(cfg.out), Path(cfg.adapter)
    train, held = training_data(cfg)
    run = train_config(cfg, train)
    result = train_cached(run, cfg.force)
    ship_adapter(Path(run.out) / "adapter", adapter, Path(cfg.base))
    merged = merge(MergeConfig(run=str(adapter), out=str(out / "merged"), dtype="float32"))
    heldout = asyncio.run(served_scores(cfg, merged, held, out / "pictures"))
    report = {
        "recipe": to_json(cfg),
        "train": {**to_json(run), **result, "cpu_count": os.cpu_count()},
        "heldout": heldout,
    }
    text = json.dumps(report, indent=2) + "\n"
    (out / "report").mkdir(parents=True, exist_ok=True)
    (out / "report" / "report.json").write_text(text)
    (adapter / "report.json").write_text(text)
    (adapter / "README.md").write_text(card_text(report, datetime.date.today().isoformat()))
    log.info("adapter %s, merged %s, report %s", adapter, merged, out / "report")
    return report
