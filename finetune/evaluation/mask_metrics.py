"""Mask scores: mean mask IoU with the ground truth, and mask mAP (pycocotools ``segm``).

``mean_iou``: over every ground-truth object of the asked classes, in every image. In each image and class,
ground-truth objects and predictions of that class are paired one-to-one greedily: all pairs by mask IoU
(full image, pycocotools ``iou``), highest first, a pair taken when both are still free. A ground-truth
object's score is the IoU of its pair; 0 when it has no pair or its pair has no mask. Extra predictions do
not lower it; mAP counts them. ``mask_map`` / ``mask_map50``: ``COCOeval(iouType="segm")``; ``box_map50``:
:func:`finetune.evaluation.metrics.coco_map` on the predicted boxes.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from finetune.data.records import Box, DetectionImage, DetectionSet
from finetune.data.segments import Segment, to_rle
from finetune.evaluation.metrics import coco_map
from paligemma.masks import encode_rle

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictedMask:
    """One object of a ``segment`` answer, in pixels of the image record (its ``width`` x ``height``)."""

    label: str
    box: tuple[float, float, float, float]
    score: float
    mask: np.ndarray | None
    """bool ``[height, width]``; None when the object had no 16 ``<seg>`` tokens (or an empty pixel box)."""


def _truth(image: DetectionImage, classes: Sequence[str]) -> list[tuple[Segment, dict[str, Any]]]:
    """The image's objects of ``classes`` with their COCO RLE (the file's mask, polygons merged)."""
    found = []
    for obj in image.objects:
        if obj.label not in classes:
            continue
        if not isinstance(obj, Segment):
            raise TypeError(f"object {obj} has no mask: load the data with finetune.data.segments.load_coco_segments")
        found.append((obj, to_rle(obj.segmentation, image.width, image.height)))
    return found


def truth_masks(image: DetectionImage, classes: Sequence[str]) -> list[tuple[Segment, np.ndarray]]:
    """The image's ground-truth objects of ``classes`` with their full-image bool masks (for pictures)."""
    return [(obj, np.asarray(mask_utils.decode(rle), dtype=bool)) for obj, rle in _truth(image, classes)]


def _rle(mask: np.ndarray, image: DetectionImage) -> dict[str, Any]:
    if mask.shape != (image.height, image.width):
        raise ValueError(f"mask of shape {mask.shape} for image {image.image_id} of {image.height}x{image.width}")
    return dict(encode_rle(mask))


def _matched_ious(preds: Sequence[dict[str, Any] | None], truth: Sequence[dict[str, Any]]) -> list[float]:
    """Per ground-truth mask, the IoU of its greedy one-to-one partner (0 without one or without a mask):
    every (prediction, truth) pair by IoU, highest first (ties: earlier prediction, then earlier truth)."""
    iou = np.zeros((len(preds), len(truth)))
    for row, rle in enumerate(preds):
        if rle is not None and truth:
            iou[row] = np.asarray(mask_utils.iou([rle], list(truth), [0] * len(truth)))[0]
    best, used = [0.0] * len(truth), set()
    for p, t in sorted(np.ndindex(*iou.shape), key=lambda pt: (-iou[pt], pt)):
        if ("p", p) not in used and ("t", t) not in used:
            best[t] = float(iou[p, t])
            used |= {("p", p), ("t", t)}
    return best


def mask_scores(
    dataset: DetectionSet, predictions: dict[int, list[PredictedMask]], classes: Sequence[str]
) -> dict[str, Any]:
    """{"mean_iou", "objects", "no_mask", "mask_map", "mask_map50", "box_map50", "per_class": {label:
    {"mean_iou", "ap50"}}} (definitions: module docstring); also "predictions", the count scored."""
    data = dataset.only(list(classes))
    names = data.classes
    category = {name: i + 1 for i, name in enumerate(names)}
    per_object: dict[str, list[float]] = {name: [] for name in names}
    gt: dict[str, Any] = {"info": {}, "images": [], "categories": [{"id": i, "name": n} for n, i in category.items()]}
    gt["annotations"], results = [], []
    no_mask = scored = 0
    for image in data.images:
        gt["images"].append({"id": image.image_id, "width": image.width, "height": image.height})
        truth = _truth(image, names)
        for obj, rle in truth:
            x1, y1, x2, y2 = obj.box
            ann: dict[str, Any] = {"id": len(gt["annotations"]) + 1, "image_id": image.image_id, "iscrowd": 0}
            ann |= {"category_id": category[obj.label], "segmentation": rle, "area": float(mask_utils.area(rle))}
            gt["annotations"].append(ann | {"bbox": [x1, y1, x2 - x1, y2 - y1]})
        preds = [p for p in predictions.get(image.image_id, []) if p.label in category]
        scored, no_mask = scored + len(preds), no_mask + sum(p.mask is None for p in preds)
        rles = [None if p.mask is None else _rle(p.mask, image) for p in preds]
        results += [
            {"image_id": image.image_id, "category_id": category[p.label], "segmentation": rle, "score": p.score}
            for p, rle in zip(preds, rles, strict=True)
            if rle is not None
        ]
        for name in names:
            mine = [rle for p, rle in zip(preds, rles, strict=True) if p.label == name]
            per_object[name] += _matched_ious(mine, [rle for obj, rle in truth if obj.label == name])
    segm = _segm_map(gt, results, names)
    boxes = {i: [Box(p.label, p.box, p.score) for p in ps] for i, ps in predictions.items()}
    every = [v for values in per_object.values() for v in values]
    return {
        "mean_iou": float(np.mean(every)) if every else None,
        "objects": len(every),
        "predictions": scored,
        "no_mask": no_mask,
        "mask_map": segm["map"],
        "mask_map50": segm["map50"],
        "box_map50": coco_map(data, boxes)["map_50"],
        "per_class": {
            n: {"mean_iou": float(np.mean(per_object[n])) if per_object[n] else None, "ap50": segm["ap50"][n]}
            for n in names
        },
    }


def _segm_map(gt_dict: dict[str, Any], results: list[dict[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    """pycocotools ``segm`` AP@[.5:.95], AP@0.5 and AP@0.5 per class (0 without detections or truth)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not results or not gt_dict["annotations"]:
        return {"map": 0.0, "map50": 0.0, "ap50": {n: 0.0 for n in names}}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
        gt = COCO()
        gt.dataset = gt_dict
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(results), iouType="segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    precision = evaluator.eval["precision"]  # [iou, recall, class, area, max_dets]
    ap50 = {}
    for k, name in enumerate(names):
        p = precision[0, :, k, 0, -1]
        ap50[name] = float(np.mean(p[p > -1])) if (p > -1).any() else 0.0
    return {"map": max(float(evaluator.stats[0]), 0.0), "map50": max(float(evaluator.stats[1]), 0.0), "ap50": ap50}
