"""A tiny PaliGemma that really detects: trained from scratch on synthetic shapes by ``finetune.train``.

The tiny random checkpoint almost never emits ``<loc>`` tokens, so tests that need boxes drawn (the
annotated PNG, the browser page) use this model instead: the tiny shape, every weight trained (method
``full``) for :data:`STEPS` steps on :data:`IMAGES` images of ``finetune.synth`` (about 20 s on two CPU
cores). It learns the ``<loc>x4 label`` grammar and rough boxes on its training images; no claim of
accuracy is made or needed. :func:`find_detection` picks a training image and object name for which the
served model answers at least one box.

:func:`cached_shapes_model` keeps the result in the temp directory, keyed by a hash of this recipe and of
the code that builds it (``finetune``, ``paligemma.checkpoint``), so repeated runs skip the training.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

STEPS = 300
IMAGES = 64
SEED = 1


def train_shapes_model(work: Path) -> Path:
    """Build, train and save the model under ``work``; returns the checkpoint directory (hub layout)."""
    from finetune.config import TrainConfig
    from finetune.synth import generate
    from finetune.train import train
    from paligemma.checkpoint import build_tiny_checkpoint

    base = build_tiny_checkpoint(work / "base", seed=0)
    data = generate(work / "data", IMAGES, seed=SEED)
    config = TrainConfig(
        base=str(base),
        out=str(work / "run"),
        method="full",
        coco=(str(data / "annotations.json"),),
        absent_per_image=0,
        lr=3e-3,
        scheduler="constant",
        warmup_steps=0,
        batch_size=8,
        max_steps=STEPS,
        max_minutes=3.0,
        threads=2,
        seed=0,
        logging_steps=50,
        save_steps=10**9,
        precision="fp32",
    )
    return train(config)


def cached_shapes_model() -> Path:
    """:func:`train_shapes_model`, cached under ``$TMPDIR/paligemma-test-cache`` (atomic: safe in parallel)."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256(Path(__file__).read_bytes())
    for source in sorted([*(root / "finetune").glob("*.py"), root / "paligemma" / "checkpoint.py"]):
        digest.update(source.read_bytes())
    cache = Path(tempfile.gettempdir()) / "paligemma-test-cache" / f"shapes-{digest.hexdigest()[:16]}"
    if (cache / "model.safetensors").is_file():
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="work-", dir=cache.parent))
    try:
        model = train_shapes_model(work)
        try:
            os.replace(model, cache)  # atomic; a concurrent run that finished first wins
        except OSError:
            if not (cache / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return cache


def training_image(index: int) -> tuple[bytes, list[tuple[str, tuple[int, int, int, int]]]]:
    """PNG bytes of training image ``index`` and its shapes as ``(name, (x1, y1, x2, y2))``."""
    from finetune.synth import render

    image, shapes = render(SEED, index)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue(), [(shape.kind, shape.box) for shape in shapes]


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


def find_detection(detect: Callable[[bytes, str], dict[str, Any]], tries: int = 8) -> tuple[bytes, str]:
    """A training image and object name for which ``detect(png, name)`` (a /detect answer) has a detection,
    preferring one that is right (label as asked, IoU >= 0.5 with a shape of that name), else the one
    overlapping its shape best; ``AssertionError`` if none of the first ``tries`` images gives a box."""
    best: tuple[bytes, str] | None = None
    best_iou = -1.0
    for index in range(tries):
        png, shapes = training_image(index)
        for name in sorted({kind for kind, _ in shapes}):
            for det in detect(png, name)["detections"]:
                box = tuple(det["box"][k] for k in ("x1", "y1", "x2", "y2"))
                truth = [_iou(box, b) for kind, b in shapes if kind == name == det["label"]]
                if max(truth, default=0.0) > best_iou:
                    best, best_iou = (png, name), max(truth, default=0.0)
            if best is not None and best_iou >= 0.5:
                return best
    if best is None:
        raise AssertionError(f"the shapes model detected nothing on its first {tries} training images")
    return best
