"""Segmentation for ``python -m finetune eval --segmentation-weights``: masks predicted as ``/segment`` predicts them.

Why a module of its own: a ``segment`` answer has to be decoded into masks exactly as the service's
``/segment`` does it (same prompt, same grammar, same parse, same VQ-VAE decoder and paste), and scored
against COCO masks, which :mod:`finetune.evaluation.evaluate`'s box scoring knows nothing about.

- :func:`predict_masks`: one ``segment <classes>`` request per image (or per group of ``classes_per_prompt``
  classes: ``1`` for a model trained with ``segment_prompt_style="per_class"``), constrained by the ``segment=True``
  detection grammar over the classes (``/segment``'s default ``max_objects``, more if the budget fits more),
  parsed from the token ids with ``/segment``'s label rule (an unlabelled object takes the class when one
  class was asked, else is dropped), masks from :func:`paligemma.segmentation.attach_masks`: a prediction is
  ``/segment``'s answer for the same ``max_new_tokens``. The budget is ``/segment``'s rule
  (:func:`paligemma.segmentation.answer_tokens`, at least 64): ``22 * n + 8`` tokens, ``n`` the larger of
  the classes asked and the most ground-truth objects of those classes in one image (no 512 cap).
- The scores (mean mask IoU, mask mAP, box mAP) are :func:`finetune.evaluation.mask_metrics.mask_scores`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from finetune.data.images import load_training_image
from finetune.data.records import Box, DetectionImage, DetectionSet
from finetune.evaluation.mask_metrics import PredictedMask, mask_scores, truth_masks
from finetune.evaluation.pictures import PICTURE_SIDE
from paligemma import prompts
from paligemma.draw import GROUND_TRUTH, PREDICTION, draw_detections, side_by_side
from paligemma.grammar import DEFAULT_MAX_OBJECTS, GrammarSpec
from paligemma.masks import encode_rle
from paligemma.parsing import parse_detection_token_ids
from paligemma.segmentation import TOKENS_PER_OBJECT, MaskDecoder, answer_tokens, attach_masks
from paligemma.tokens import SpecialIds
from service.engines.protocol import Engine, Generation, GenerationRequest

log = logging.getLogger(__name__)


DEFAULT_MAX_NEW_TOKENS = 64
"""The service's default ``max_new_tokens``, the least a ``segment`` request gets."""


def segment_budget(dataset: DetectionSet, classes: Sequence[str]) -> int:
    """``/segment``'s ``max_new_tokens`` rule for enough objects for every image of ``dataset``."""
    most = max((sum(o.label in classes for o in im.objects) for im in dataset.images), default=0)
    return max(DEFAULT_MAX_NEW_TOKENS, answer_tokens(max(len(classes), most)))


async def predict_masks(
    engine: Engine,
    dataset: DetectionSet,
    classes: Sequence[str],
    decoder: MaskDecoder,
    *,
    classes_per_prompt: int = 0,
    max_new_tokens: int | None = None,
    concurrency: int = 64,
    adapter: str | None = None,
) -> tuple[dict[int, list[PredictedMask]], list[str]]:
    """One `segment <classes>` request per image and group of ``classes_per_prompt`` classes (0: all in one),
    constrained and decoded as /segment does; returns predictions per image_id and every generated text (image
    by image, group by group) so two engines can be compared token for token."""
    names = list(dict.fromkeys(classes))
    size = classes_per_prompt if classes_per_prompt > 0 else max(1, len(names))
    groups = [names[i : i + size] for i in range(0, len(names), size)]
    tokenizer: Any = engine.tokenizer()
    special = SpecialIds.from_tokenizer(tokenizer)
    eos = int(tokenizer.eos_token_id)
    asks: list[tuple[str, int, GrammarSpec]] = []
    for group in groups:
        budget = max_new_tokens if max_new_tokens is not None else segment_budget(dataset, group)
        most = max(DEFAULT_MAX_OBJECTS, budget // TOKENS_PER_OBJECT)
        grammar = GrammarSpec.build(tokenizer, special, eos, group, segment=True, max_objects=most, max_tokens=budget)
        asks.append((prompts.segment(group), budget, grammar))
    gate = asyncio.Semaphore(concurrency)

    async def one(image: DetectionImage) -> list[Generation]:
        async with gate:  # images are read in turn, not all at once
            pixels = load_training_image(image.path)
            requests = [GenerationRequest(pixels, prefix, n, adapter=adapter, grammar=g) for prefix, n, g in asks]
            return list(await asyncio.gather(*(engine.generate(r) for r in requests)))

    generations = await asyncio.gather(*(one(im) for im in dataset.images))

    def decode(ids: list[int]) -> str:  # as service.api.detections.labelled_detections
        return str(tokenizer.decode(ids, skip_special_tokens=True))

    out: dict[int, list[PredictedMask]] = {}
    for image, answers in zip(dataset.images, generations, strict=True):
        parsed = []
        for group, gen in zip(groups, answers, strict=True):
            found = parse_detection_token_ids(
                gen.token_ids, image.width, image.height, special=special, decode=decode, logprobs=gen.logprobs
            )
            for det in found:
                if det.label is None and len(group) == 1:
                    det.label = group[0]
            parsed += [d for d in found if d.label is not None]
        kept = await asyncio.to_thread(attach_masks, parsed, decoder, image.width, image.height)
        out[image.image_id] = [
            PredictedMask(str(d.label), d.box, 1.0 if d.score is None else d.score, d.mask) for d in kept
        ]
    return out, [gen.text for answers in generations for gen in answers]


def segment_picture(
    image: Image.Image, truth: Sequence[tuple[Box, np.ndarray]], panels: dict[str, Sequence[PredictedMask]]
) -> Image.Image:
    """Ground-truth masks and boxes (green) beside each panel's predicted ones (blue, translucent), scaled up as
    :func:`finetune.evaluation.evaluate.comparison_picture` scales, masks by nearest neighbour."""
    factor = max(1.0, PICTURE_SIDE / min(image.size))
    size = (round(image.width * factor), round(image.height * factor))
    big = image.resize(size, Image.Resampling.BICUBIC)

    def scaled(label: str, box: Sequence[float], score: float, mask: np.ndarray | None) -> PredictedMask:
        grown = mask if mask is None else Image.fromarray(mask.astype(bool)).resize(size, Image.Resampling.NEAREST)
        box4 = (box[0] * factor, box[1] * factor, box[2] * factor, box[3] * factor)
        return PredictedMask(label, box4, score, None if grown is None else np.asarray(grown))

    truth_big = [scaled(o.label, o.box, 1.0, m) for o, m in truth]
    drawn = [draw_detections(big, truth_big, color=GROUND_TRUTH, show_score=False)]
    for preds in panels.values():
        drawn.append(draw_detections(big, [scaled(p.label, p.box, p.score, p.mask) for p in preds], color=PREDICTION))
    return side_by_side(drawn, titles=["ground truth", *panels])


def _record(p: PredictedMask) -> dict[str, Any]:
    mask = None if p.mask is None else encode_rle(p.mask)
    return {"label": p.label, "box": list(p.box), "score": p.score, "mask": mask}


async def segmentation_report(
    engine: Engine,
    dataset: DetectionSet,
    weights: str | Path,
    *,
    classes_per_prompt: int = 1,
    out: str | Path | None = None,
    pictures: int = 8,
    concurrency: int = 64,
    adapter: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``evaluate``'s segmentation part: the report section (mask_scores plus images, classes, budget and
    pictures ``pictures/segment-NNN.png``) and the records for ``predictions.json`` (text and objects, RLE)."""
    decoder = await asyncio.to_thread(MaskDecoder.from_npz, weights)
    classes = list(dataset.classes)
    preds, texts = await predict_masks(
        engine,
        dataset,
        classes,
        decoder,
        classes_per_prompt=classes_per_prompt,
        concurrency=concurrency,
        adapter=adapter,
    )
    section: dict[str, Any] = {
        "images": len(dataset.images),
        "classes": classes,
        "classes_per_prompt": classes_per_prompt,
    }
    section |= mask_scores(dataset, preds, classes)
    iou, figures = section["mean_iou"], [section[k] for k in ("mask_map", "mask_map50", "box_map50")]
    log.info(
        "segmentation: mean mask IoU %s over %d objects (%d predictions without a mask); mask mAP %.3f, "
        "mask mAP@0.5 %.3f, box mAP@0.5 %.3f",
        "n/a" if iou is None else f"{iou:.3f}",
        section["objects"],
        section["no_mask"],
        *figures,
    )
    per_image = len(texts) // max(1, len(dataset.images))  # one text per prompt, image by image
    records = {
        str(im.image_id): {
            "texts": texts[i * per_image : (i + 1) * per_image],
            "objects": [_record(p) for p in preds[im.image_id]],
        }
        for i, im in enumerate(dataset.images)
    }
    if out is not None and pictures > 0:
        folder = Path(out) / "pictures"
        folder.mkdir(parents=True, exist_ok=True)
        section["pictures"] = []
        for i, image in enumerate(dataset.images[:pictures]):
            panel = {f"segment ({engine.model_name})": preds[image.image_id]}
            picture = segment_picture(load_training_image(image.path), truth_masks(image, classes), panel)
            picture.save(folder / f"segment-{i:03d}.png")
            section["pictures"].append(str(folder / f"segment-{i:03d}.png"))
    return section, records
