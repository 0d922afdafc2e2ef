"""The committed demo model (``models/demo``) in tests that need a model that really detects.

The tiny random checkpoint almost never emits ``<loc>`` tokens, so tests that need boxes drawn (the
annotated PNG, the browser page, the before/after comparison) use the shipped demo model: trained once by
``python -m finetune demo`` (its card, ``models/demo/README.md``, says how) and committed, so every clone
tests the same weights and no test trains a model. :func:`find_detection` picks a held-out image and object
name for which the served model answers at least one box.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEMO_MODEL = Path(__file__).resolve().parents[1] / "models" / "demo"


def heldout_image(index: int) -> tuple[bytes, list[tuple[str, tuple[int, int, int, int]]]]:
    """PNG bytes of held-out image ``index`` and its shapes as ``(name, (x1, y1, x2, y2))``."""
    from finetune.data.synth import render
    from finetune.recipes.demo_config import DemoConfig

    image, shapes = render(DemoConfig().heldout_seed, index)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue(), [(shape.kind, shape.box) for shape in shapes]


def find_detection(detect: Callable[[bytes, str], dict[str, Any]], tries: int = 8) -> tuple[bytes, str]:
    """A held-out image and object name for which ``detect(png, name)`` (a /detect answer) has a detection,
    preferring one that is right (label as asked, IoU >= 0.5 with a shape of that name), else the one
    overlapping its shape best; ``AssertionError`` if none of the first ``tries`` images gives a box."""
    from finetune.evaluation.compare import box_iou

    best: tuple[bytes, str] | None = None
    best_iou = -1.0
    for index in range(tries):
        png, shapes = heldout_image(index)
        for name in sorted({kind for kind, _ in shapes}):
            for det in detect(png, name)["detections"]:
                box = tuple(det["box"][k] for k in ("x1", "y1", "x2", "y2"))
                truth = [box_iou(box, b) for kind, b in shapes if kind == name == det["label"]]
                if max(truth, default=0.0) > best_iou:
                    best, best_iou = (png, name), max(truth, default=0.0)
            if best is not None and best_iou >= 0.5:
                return best
    if best is None:
        raise AssertionError(f"the demo model detected nothing on its first {tries} held-out images")
    return best
