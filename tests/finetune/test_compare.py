"""``eval --compare``: two real tiny checkpoints on the same synthetic images; pictures, sheets and report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from finetune.data.records import Box
from finetune.evaluation.compare import box_iou, image_iou, markdown_report

PANEL = 336  # finetune.evaluation.evaluate.PICTURE_SIDE: 112-px images drawn at 336 px
GAP = 8


def test_box_iou_and_image_iou() -> None:
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    truth = [Box("circle", (0, 0, 10, 10)), Box("square", (20, 20, 30, 30))]
    # best same-label match per ground-truth box; the wrong label and the extra box do not count
    preds = [Box("circle", (5, 0, 15, 10)), Box("circle", (0, 0, 10, 10)), Box("triangle", (20, 20, 30, 30))]
    assert image_iou(truth, preds) == pytest.approx((1.0 + 0.0) / 2)
    assert image_iou(truth, []) == 0.0
    assert image_iou([], preds) is None


def test_compare_two_tiny_checkpoints(
    tiny_checkpoint: Path, demo_checkpoint: Path, shapes: Path, tmp_path: Path
) -> None:
    from finetune.__main__ import main

    out = tmp_path / "compare"
    main(
        [
            "eval",
            "--model", str(demo_checkpoint),
            "--compare", str(tiny_checkpoint),
            "--coco", str(shapes / "annotations.json"),
            "--vqa", str(shapes / "vqa.jsonl"),
            "--limit", "3",
            "--pictures", "2",
            "--sheet", "3",
            "--out", str(out),
        ]
    )  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    for role in ("base", "finetuned"):
        assert set(report[role]["detection"]) >= {"map", "map_50", "mean_iou", "images"}
        assert report[role]["detection"]["images"] == 3
        assert 0.0 <= report[role]["vqa"]["accuracy"] <= 1.0 and report[role]["vqa"]["questions"] == 3
        assert (out / role / "predictions.json").is_file()
    assert report["base"]["model"] != report["finetuned"]["model"]
    assert [row["file"] for row in report["per_image"]] == ["000000.png", "000001.png", "000002.png"]
    for row in report["per_image"]:
        assert row["iou_change"] == pytest.approx(row["iou_finetuned"] - row["iou_base"], abs=1e-3)
    assert sum(report["iou_change"][k] for k in ("improved", "worse", "same")) == 3

    pictures = sorted(p.name for p in (out / "pictures").glob("*.png"))
    assert pictures == ["000.png", "001.png", "vqa-000.png", "vqa-001.png"]  # --pictures 2 of each kind
    detection = Image.open(out / "pictures" / "000.png")
    assert detection.width == 2 * PANEL + 3 * GAP  # base | finetuned, ground truth drawn on both
    assert detection.height > PANEL + 40  # titles above, IoU line and legend below
    vqa = Image.open(out / "pictures" / "vqa-000.png")
    assert vqa.width >= PANEL and vqa.height > PANEL + 4 * 20  # question, truth, two answers
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size == (2 * (detection.width + GAP) + GAP, 2 * (detection.height + GAP) + GAP)  # 3 in a 2x2 grid
    assert Image.open(out / "contact_sheet_vqa.png").width == 2 * (vqa.width + GAP) + GAP

    table = (out / "report.md").read_text()
    assert table == markdown_report(report)
    assert "| mAP@0.5 |" in table and "| VQA accuracy |" in table and "| 000002.png | " in table
