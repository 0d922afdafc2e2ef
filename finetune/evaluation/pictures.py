"""Comparison pictures: the image scaled up, ground truth and each model's boxes side by side.

One column per model on the image, ground truth green in the first column, predictions blue with label and
score (:func:`comparison_picture`); :func:`write_pictures` writes ``pictures/NNN.png`` for an evaluation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from finetune.data.images import load_training_image
from finetune.data.records import Box, DetectionSet
from paligemma.draw import GROUND_TRUTH, PREDICTION, draw_detections, side_by_side

log = logging.getLogger(__name__)


PICTURE_SIDE = 336


def _scaled(boxes: Sequence[Box], factor: float) -> list[Box]:
    return [Box(b.label, tuple(v * factor for v in b.box), b.score) for b in boxes]  # type: ignore[arg-type]


def comparison_picture(
    image: Image.Image,
    ground_truth: Sequence[Box],
    columns: Sequence[tuple[str, Sequence[Box]]],
    *,
    truth_in_columns: bool = False,
) -> Image.Image:
    """Ground truth (green) then one panel per ``(title, predictions)`` column (blue, label and score).

    ``truth_in_columns``: no ground-truth panel; the truth is drawn in green under every column's
    predictions instead, so the columns compare directly (``eval --compare``: base left, finetuned right).
    """
    factor = max(1.0, PICTURE_SIDE / min(image.size))
    big = image.resize((round(image.width * factor), round(image.height * factor)), Image.Resampling.BICUBIC)
    truth = draw_detections(big, _scaled(ground_truth, factor), color=GROUND_TRUTH, show_score=False)
    under, panels, titles = (truth, [], []) if truth_in_columns else (big, [truth], ["ground truth"])
    panels += [draw_detections(under, _scaled(boxes, factor), color=PREDICTION) for _, boxes in columns]
    return side_by_side(panels, titles=[*titles, *(title for title, _ in columns)])


def write_pictures(
    dataset: DetectionSet, columns: Sequence[tuple[str, dict[int, list[Box]]]], out: Path, count: int
) -> list[str]:
    """``count`` comparison pictures (first images of ``dataset``) under ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(dataset.images[:count]):
        cols = [(title, preds.get(image.image_id, [])) for title, preds in columns]
        path = out / f"{i:03d}.png"
        comparison_picture(load_training_image(image.path), image.objects, cols).save(path)
        paths.append(str(path))
    return paths
