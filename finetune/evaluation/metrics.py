"""Scores: COCO mAP through pycocotools (no hand-written mAP), VQA accuracy, and the trivial baselines.

- :func:`coco_map` builds the ground truth and the results in memory and runs ``COCOeval`` (bbox):
  ``map`` is mAP@[.5:.95], ``map_50`` mAP@0.5, as COCO reports them (101-point interpolation, 100 detections
  per image, every category averaged). A prediction's ``score`` orders it; missing scores count as 1.
- :func:`vqa_accuracy`: normalised exact match against one answer; with several reference answers the
  VQAv2 formula ``min(#references equal to the prediction / 3, 1)``. Normalisation (:func:`normalize_answer`):
  lower case, punctuation and articles removed, number words 0-10 as digits, single spaces.
- Baselines for the benchmark: :func:`mean_box_baseline` (every class that *is* in the image gets the
  training set's mean box for that class: generous, it knows which classes are present) and
  :func:`majority_answer_baseline` (the most common training answer to the same question text).
"""

from __future__ import annotations

import contextlib
import io
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from finetune.data.records import Box, DetectionSet, VQARecord

_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_NUMBERS = {w: str(i) for i, w in enumerate(_WORDS)}
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[^\w\s]")


def _coco_dicts(dataset: DetectionSet, predictions: Mapping[int, Sequence[Box]]) -> tuple[dict[str, Any], list[Any]]:
    category = {name: i + 1 for i, name in enumerate(dataset.classes)}
    gt: dict[str, Any] = {
        "info": {},  # pycocotools 2.0.10's loadRes copies it
        "images": [{"id": im.image_id, "width": im.width, "height": im.height} for im in dataset.images],
        "categories": [{"id": i, "name": name} for name, i in category.items()],
        "annotations": [],
    }
    for im in dataset.images:
        for obj in im.objects:
            x1, y1, x2, y2 = obj.box
            gt["annotations"].append(
                {
                    "id": len(gt["annotations"]) + 1,
                    "image_id": im.image_id,
                    "category_id": category[obj.label],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
    results = []
    for image_id, boxes in predictions.items():
        for det in boxes:
            if det.label not in category:
                continue
            x1, y1, x2, y2 = det.box
            score = 1.0 if det.score is None else float(det.score)
            bbox = [x1, y1, x2 - x1, y2 - y1]
            results.append({"image_id": image_id, "category_id": category[det.label], "bbox": bbox, "score": score})
    return gt, results


def coco_map(dataset: DetectionSet, predictions: Mapping[int, Sequence[Box]]) -> dict[str, Any]:
    """pycocotools bbox evaluation: ``map``, ``map_50``, ``map_75`` and ``ap_50`` per class."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_dict, results = _coco_dicts(dataset, predictions)
    empty = {"map": 0.0, "map_50": 0.0, "map_75": 0.0, "ap_50": {c: 0.0 for c in dataset.classes}}
    if not results or not gt_dict["annotations"]:
        return {**empty, "detections": len(results)}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
        gt = COCO()
        gt.dataset = gt_dict
        gt.createIndex()
        dt = gt.loadRes(results)
        evaluator = COCOeval(gt, dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = [max(float(s), 0.0) for s in evaluator.stats]  # -1 means "no such objects"
    precision = evaluator.eval["precision"]  # [iou, recall, class, area, max_dets]
    per_class = {}
    for k, name in enumerate(dataset.classes):
        p = precision[0, :, k, 0, -1]
        per_class[name] = float(np.mean(p[p > -1])) if (p > -1).any() else 0.0
    return {"map": stats[0], "map_50": stats[1], "map_75": stats[2], "ap_50": per_class, "detections": len(results)}


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation or articles, number words as digits, single spaces."""
    words = _PUNCT.sub(" ", str(text).lower()).split()
    return " ".join(_NUMBERS.get(w, w) for w in words if w not in _ARTICLES)


def answer_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """1/0 exact match for one reference; VQAv2 ``min(matches / 3, 1)`` for several."""
    pred = normalize_answer(prediction)
    matches = sum(normalize_answer(a) == pred for a in answers)
    if len(answers) == 1:
        return float(matches)
    return min(matches / 3.0, 1.0)


def vqa_accuracy(predictions: Sequence[str], records: Sequence[VQARecord]) -> dict[str, Any]:
    """Mean accuracy over questions, overall and per question ``type`` when the records have one."""
    if len(predictions) != len(records):
        raise ValueError(f"{len(predictions)} predictions for {len(records)} questions")
    scores = [answer_accuracy(p, r.answers) for p, r in zip(predictions, records, strict=True)]
    by_type: dict[str, list[float]] = {}
    for score, rec in zip(scores, records, strict=True):
        if rec.kind:
            by_type.setdefault(rec.kind, []).append(score)
    return {
        "questions": len(scores),
        "accuracy": float(np.mean(scores)) if scores else 0.0,
        "by_type": {k: float(np.mean(v)) for k, v in sorted(by_type.items())},
    }


def mean_box_baseline(train: DetectionSet, test: DetectionSet) -> dict[int, list[Box]]:
    """Each class present in a test image gets the class's mean training box (relative coordinates)."""
    sums: dict[str, list[np.ndarray]] = {}
    for im in train.images:
        scale = np.array([im.width, im.height, im.width, im.height], dtype=float)
        for obj in im.objects:
            sums.setdefault(obj.label, []).append(np.asarray(obj.box) / scale)
    means = {label: np.mean(rows, axis=0) for label, rows in sums.items()}
    out: dict[int, list[Box]] = {}
    for im in test.images:
        scale = np.array([im.width, im.height, im.width, im.height], dtype=float)
        present = dict.fromkeys(o.label for o in im.objects if o.label in means)
        out[im.image_id] = [Box(label, _box(means[label] * scale), 1.0) for label in present]
    return out


def _box(values: np.ndarray) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = (float(v) for v in values)
    return x1, y1, x2, y2


def majority_answer_baseline(train: Sequence[VQARecord], test: Sequence[VQARecord]) -> list[str]:
    """The most common training answer to the same question text (else the most common answer overall)."""
    per_question: dict[str, Counter[str]] = {}
    overall: Counter[str] = Counter()
    for rec in train:
        for a in rec.answers:
            per_question.setdefault(rec.question, Counter())[normalize_answer(a)] += 1
            overall[normalize_answer(a)] += 1
    fallback = overall.most_common(1)[0][0] if overall else ""
    return [per_question[r.question].most_common(1)[0][0] if r.question in per_question else fallback for r in test]
