"""mAP equals pycocotools' own run on a fixed set of predictions; VQA accuracy; baselines."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from finetune.data.loaders import load_coco
from finetune.data.records import Box, DetectionImage, DetectionSet, VQARecord
from finetune.evaluation.metrics import (
    answer_accuracy,
    coco_map,
    majority_answer_baseline,
    mean_box_baseline,
    normalize_answer,
    vqa_accuracy,
)

PREDICTIONS = [  # (image_id, class, (x1, y1, x2, y2), score): hits, near misses, a duplicate, a false positive
    (0, "circle", (10.0, 10.0, 30.0, 30.0), 0.9),
    (0, "circle", (12.0, 11.0, 31.0, 33.0), 0.4),
    (0, "square", (50.0, 50.0, 70.0, 72.0), 0.8),
    (0, "square", (0.0, 80.0, 15.0, 99.0), 0.7),
    (1, "circle", (40.0, 40.0, 60.0, 58.0), 0.6),
    (1, "triangle", (5.0, 60.0, 40.0, 95.0), 0.95),
    (1, "triangle", (70.0, 5.0, 90.0, 20.0), 0.3),
]


def _dataset() -> DetectionSet:
    images = [
        DetectionImage(0, Path("a.png"), 100, 100, [Box("circle", (10, 10, 30, 30)), Box("square", (52, 50, 70, 70))]),
        DetectionImage(
            1,
            Path("b.png"),
            100,
            100,
            [Box("circle", (38, 41, 61, 60)), Box("triangle", (8, 60, 42, 90)), Box("triangle", (70, 70, 80, 80))],
        ),
    ]
    return DetectionSet(images, ["circle", "square", "triangle"])


def test_map_equals_pycocotools_on_files(tmp_path: Path) -> None:
    data = _dataset()
    cats = {name: i + 1 for i, name in enumerate(data.classes)}
    gt = {
        "images": [{"id": im.image_id, "width": 100, "height": 100, "file_name": im.path.name} for im in data.images],
        "categories": [{"id": i, "name": n} for n, i in cats.items()],
        "annotations": [
            {
                "id": k,
                "image_id": im.image_id,
                "category_id": cats[o.label],
                "bbox": [o.box[0], o.box[1], o.box[2] - o.box[0], o.box[3] - o.box[1]],
                "area": (o.box[2] - o.box[0]) * (o.box[3] - o.box[1]),
                "iscrowd": 0,
            }
            for k, (im, o) in enumerate(((im, o) for im in data.images for o in im.objects), start=1)
        ],
    }
    results = [
        {"image_id": i, "category_id": cats[c], "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": s}
        for i, c, b, s in PREDICTIONS
    ]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(results))
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(tmp_path / "gt.json"))
        evaluator = COCOeval(coco, coco.loadRes(str(tmp_path / "dt.json")), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    preds: dict[int, list[Box]] = {0: [], 1: []}
    for i, c, b, s in PREDICTIONS:
        preds[i].append(Box(c, b, s))
    ours = coco_map(data, preds)
    assert ours["map"] == pytest.approx(evaluator.stats[0], abs=1e-12)
    assert ours["map_50"] == pytest.approx(evaluator.stats[1], abs=1e-12)
    assert ours["map_75"] == pytest.approx(evaluator.stats[2], abs=1e-12)
    assert 0 < ours["map"] < ours["map_50"] < 1


def test_perfect_and_empty_predictions() -> None:
    data = _dataset()
    perfect = {im.image_id: [Box(o.label, o.box, 1.0) for o in im.objects] for im in data.images}
    assert coco_map(data, perfect)["map"] == pytest.approx(1.0)
    assert coco_map(data, {0: [], 1: []})["map_50"] == 0.0


def test_vqa_accuracy_normalises_and_uses_the_vqav2_formula() -> None:
    assert normalize_answer("  The Two. ") == "2"
    assert answer_accuracy("two", ["2"]) == 1.0
    assert answer_accuracy("Red!", ["red"]) == 1.0
    assert answer_accuracy("blue", ["red"]) == 0.0
    assert answer_accuracy("blue", ["blue", "blue", "navy"] + ["navy"] * 7) == pytest.approx(2 / 3)
    assert answer_accuracy("blue", ["blue"] * 3 + ["navy"] * 7) == 1.0
    records = [VQARecord(Path("a"), "q1", ("yes",), "exists"), VQARecord(Path("a"), "q2", ("two",), "count")]
    report = vqa_accuracy(["yes", "3"], records)
    assert report["accuracy"] == 0.5 and report["by_type"] == {"count": 0.0, "exists": 1.0}


def test_baselines(shapes: Path) -> None:
    data = load_coco(shapes / "annotations.json")
    preds = mean_box_baseline(data, data)
    assert all(len(preds[im.image_id]) == len({o.label for o in im.objects}) for im in data.images)
    train = [VQARecord(Path("a"), "is there a circle?", (a,)) for a in ("yes", "yes", "no")]
    test = [VQARecord(Path("b"), "is there a circle?", ("no",)), VQARecord(Path("b"), "new?", ("x",))]
    assert majority_answer_baseline(train, test) == ["yes", "yes"]
