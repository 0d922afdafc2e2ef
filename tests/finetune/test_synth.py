"""The synthetic shapes generator: deterministic per seed, COCO + VQA that our loaders accept."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image

from finetune.data.loaders import load_coco, load_vqa
from finetune.data.segments import decode_mask, load_coco_segments
from finetune.data.synth import COLORS, NUMBERS, generate


def _digest(root: Path) -> str:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()


def test_same_seed_same_bytes_other_seed_other_data(tmp_path: Path) -> None:
    a, b, c = (generate(tmp_path / name, 6, seed=seed) for name, seed in (("a", 3), ("b", 3), ("c", 4)))
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_layout_and_contents(tmp_path: Path) -> None:
    root = generate(tmp_path / "s", 20, seed=0)
    data = load_coco(root / "annotations.json", on_error="fail")
    assert data.classes == ["circle", "square", "triangle"]
    assert len(data.images) == 20 and all(1 <= len(im.objects) <= 4 for im in data.images)
    raw = json.loads((root / "annotations.json").read_text())
    assert all(ann["color"] for ann in raw["annotations"])
    questions = load_vqa(root / "vqa.jsonl", on_error="fail")
    assert len(questions) == 40 and {q.kind for q in questions} <= {
        "count",
        "count_kind",
        "exists",
        "color",
        "position",
        "shape",
    }
    by_path = {im.path: im for im in data.images}
    for q in questions:
        if q.kind == "count":
            assert q.answers == (NUMBERS[len(by_path[q.image].objects)],)


def test_max_shapes_and_question_types(tmp_path: Path) -> None:
    root = generate(tmp_path / "one", 12, seed=0, max_shapes=1, question_types=("shape",), questions_per_image=1)
    data = load_coco(root / "annotations.json", on_error="fail")
    raw = json.loads((root / "annotations.json").read_text())
    colors = {ann["image_id"]: ann["color"] for ann in raw["annotations"]}
    questions = load_vqa(root / "vqa.jsonl", on_error="fail")
    assert all(len(im.objects) == 1 for im in data.images) and len(questions) == 12
    for image, q in zip(data.images, questions, strict=True):
        (only,) = image.objects
        assert q.kind == "shape" and q.question == f"what shape is the {colors[image.image_id]} one?"
        assert q.answers == (only.label,)


def test_masks_are_exactly_the_painted_pixels_and_load_as_segments(tmp_path: Path) -> None:
    root = generate(tmp_path / "m", 12, seed=5, masks=True)
    raw = json.loads((root / "annotations.json").read_text())
    segments = load_coco_segments(root / "annotations.json", on_error="fail")
    assert sum(len(im.objects) for im in segments.images) == len(raw["annotations"])
    files = {im["id"]: im["file_name"] for im in raw["images"]}
    for ann in raw["annotations"]:
        pixels = np.asarray(Image.open(root / files[ann["image_id"]]).convert("RGB"))
        mask = decode_mask(ann["segmentation"], 112, 112).astype(bool)
        x, y, w, h = ann["bbox"]
        inside = np.zeros_like(mask)
        inside[y : y + h, x : x + w] = True
        painted = (pixels == COLORS[ann["color"]]).all(axis=-1) & inside
        assert mask.sum() > 0
        assert np.array_equal(mask, painted), ann["id"]  # the mask is the shape, not its box


def test_masks_are_off_by_default(tmp_path: Path) -> None:
    raw = json.loads((generate(tmp_path / "d", 3, seed=5) / "annotations.json").read_text())
    assert not any("segmentation" in ann for ann in raw["annotations"])
