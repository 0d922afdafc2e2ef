"""Before/after comparison: a base and a finetuned model on the same held-out images (``eval --compare``).

Each model is scored by :func:`finetune.evaluation.evaluate.evaluate` in turn (one engine loaded at a time, so two
large models never share the accelerator), which writes its own ``base/`` and ``finetuned/`` report and
predictions. This module then reads both predictions back and writes, under ``out``:

- ``report.json``: both models' metrics, their differences, and the per-image IoU of both models;
- ``report.md``: the same as tables (also printed by the CLI);
- ``pictures/NNN.png``: one per detection image, left the base model, right the finetuned one, each
  panel with the ground truth in green and the model's boxes in blue (label and score), and the
  per-image IoU of both under the panels (:func:`finetune.evaluation.evaluate.comparison_picture`'s columns);
- ``pictures/vqa-NNN.png``: the image with the question, the reference answer and both answers under it;
- ``contact_sheet.png`` / ``contact_sheet_vqa.png``: the first ``sheet`` comparisons in one grid.

**Per-image IoU** (:func:`image_iou`): for each ground-truth box, the best IoU of any predicted box with
the same label (0 when there is none), averaged over the image's ground-truth boxes. It rewards finding
every object and placing it well; extra false boxes do not lower it (mAP accounts for those). Images
without ground-truth objects have no per-image IoU. The change is ``finetuned - base``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from finetune.data.images import load_training_image
from finetune.data.records import Box, DetectionSet, VQARecord
from finetune.evaluation.evaluate import evaluate
from finetune.evaluation.metrics import answer_accuracy
from finetune.evaluation.pictures import PICTURE_SIDE, comparison_picture
from paligemma.draw import GROUND_TRUTH, contact_sheet

log = logging.getLogger(__name__)
ROLES = ("base", "finetuned")
RIGHT, WRONG, TEXT = (0, 150, 60), (210, 40, 40), (0, 0, 0)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def image_iou(truth: Sequence[Box], predictions: Sequence[Box]) -> float | None:
    """Mean over ground-truth boxes of the best same-label predicted IoU (module docstring); None if no truth."""
    if not truth:
        return None
    best = [max((box_iou(t.box, p.box) for p in predictions if p.label == t.label), default=0.0) for t in truth]
    return sum(best) / len(best)


def with_lines(picture: Image.Image, lines: Sequence[tuple[str, tuple[int, int, int]]]) -> Image.Image:
    """``picture`` with a white strip below holding ``lines`` of coloured text."""
    font = ImageFont.load_default(size=15)
    step, pad = 21, 8
    out = Image.new("RGB", (picture.width, picture.height + pad + step * len(lines)), "white")
    out.paste(picture, (0, 0))
    draw = ImageDraw.Draw(out)
    for i, (text, color) in enumerate(lines):
        draw.text((pad, picture.height + i * step), text, fill=color, font=font)
    return out


def _boxes(records: dict[str, list[dict[str, Any]]], image_id: int) -> list[Box]:
    return [Box(r["label"], tuple(r["box"]), r.get("score")) for r in records.get(str(image_id), [])]


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _change(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(b - a, 4)


def detection_rows(
    dataset: DetectionSet, predictions: dict[str, dict[str, list[dict[str, Any]]]]
) -> list[dict[str, Any]]:
    """Per image: file, objects, both models' box counts and per-image IoU, and the change."""
    rows = []
    for image in dataset.images:
        boxes = {role: _boxes(predictions[role], image.image_id) for role in ROLES}
        iou = {role: image_iou(image.objects, boxes[role]) for role in ROLES}
        rows.append(
            {
                "image_id": image.image_id,
                "file": image.path.name,
                "objects": len(image.objects),
                **{f"boxes_{role}": len(boxes[role]) for role in ROLES},
                **{f"iou_{role}": _round(iou[role]) for role in ROLES},
                "iou_change": _change(iou["base"], iou["finetuned"]),
            }
        )
    return rows


def detection_pictures(
    dataset: DetectionSet,
    predictions: dict[str, dict[str, list[dict[str, Any]]]],
    rows: Sequence[dict[str, Any]],
    titles: dict[str, str],
    folder: Path,
    count: int,
) -> list[Path]:
    """Base left, finetuned right, ground truth on both; per-image IoU under the panels."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (image, row) in enumerate(zip(dataset.images[:count], rows, strict=False)):
        columns = [(titles[role], _boxes(predictions[role], image.image_id)) for role in ROLES]
        picture = comparison_picture(load_training_image(image.path), image.objects, columns, truth_in_columns=True)
        text = f"IoU per image: base {_fmt(row['iou_base'])} -> finetuned {_fmt(row['iou_finetuned'])}"
        legend = "green: ground truth, blue: prediction (label score)"
        path = folder / f"{i:03d}.png"
        with_lines(picture, [(text, TEXT), (legend, (90, 90, 90))]).save(path)
        paths.append(path)
    return paths


def vqa_pictures(
    records: Sequence[VQARecord], answers: dict[str, list[str]], titles: dict[str, str], folder: Path, count: int
) -> list[Path]:
    """The image (scaled up) with the question, the reference answer and both models' answers below."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, record in enumerate(records[:count]):
        image = load_training_image(record.image)
        factor = max(1.0, PICTURE_SIDE / min(image.size))
        big = image.resize((round(image.width * factor), round(image.height * factor)), Image.Resampling.BICUBIC)
        canvas = Image.new("RGB", (max(big.width + 16, 2 * PICTURE_SIDE), big.height + 16), "white")
        canvas.paste(big, (8, 8))
        lines = [(f"Q: {record.question}", TEXT), (f"truth: {' / '.join(dict.fromkeys(record.answers))}", GROUND_TRUTH)]
        for role in ROLES:
            said = answers[role][i]
            ok = answer_accuracy(said, record.answers) > 0
            shown = said if len(said) <= 40 else said[:39] + "..."
            verdict = "right" if ok else "wrong"
            lines.append((f"{verdict} - {titles[role]}: {shown or '(nothing)'}", RIGHT if ok else WRONG))
        path = folder / f"vqa-{i:03d}.png"
        with_lines(canvas, lines).save(path)
        paths.append(path)
    return paths


def markdown_report(report: dict[str, Any], rows: int = 10) -> str:
    """Both models' metrics side by side, then the first ``rows`` per-image IoU changes."""
    lines = ["| metric | base | finetuned | change |", "|---|---|---|---|"]
    for name, key in (("mAP", "map"), ("mAP@0.5", "map_50"), ("mean per-image IoU", "mean_iou")):
        if "detection" in report["finetuned"]:
            a, b = report["base"]["detection"][key], report["finetuned"]["detection"][key]
            lines.append(f"| {name} | {_fmt(a)} | {_fmt(b)} | {_fmt(_change(a, b))} |")
    if "vqa" in report["finetuned"]:
        a, b = report["base"]["vqa"]["accuracy"], report["finetuned"]["vqa"]["accuracy"]
        lines.append(f"| VQA accuracy | {_fmt(a)} | {_fmt(b)} | {_fmt(_change(a, b))} |")
    per_image = report.get("per_image", [])
    if per_image:
        lines += ["", "| image | objects | IoU base | IoU finetuned | change |", "|---|---|---|---|---|"]
        for row in per_image[:rows]:
            cells = (row["objects"], _fmt(row["iou_base"]), _fmt(row["iou_finetuned"]), _fmt(row["iou_change"]))
            lines.append(f"| {row['file']} | " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return round(sum(kept) / len(kept), 4) if kept else None


async def compare(
    engines: dict[str, Any],
    *,
    detection: DetectionSet | None = None,
    vqa: Sequence[VQARecord] | None = None,
    out: str | Path,
    pictures: int = 8,
    sheet: int = 8,
    **evaluate_kwargs: Any,
) -> dict[str, Any]:
    """Score ``engines["base"]`` and ``engines["finetuned"]`` (each an async context manager giving an Engine)
    on the same data; write the comparison report, pictures and contact sheets under ``out``."""
    folder = Path(out)
    reports: dict[str, dict[str, Any]] = {}
    for role in ROLES:
        async with engines[role] as engine:
            reports[role] = await evaluate(
                engine, detection=detection, vqa=vqa, out=folder / role, pictures=0, **evaluate_kwargs
            )
    predictions = {role: json.loads((folder / role / "predictions.json").read_text()) for role in ROLES}
    titles = {role: f"{role} ({reports[role]['model']})" for role in ROLES}
    report: dict[str, Any] = {role: {k: v for k, v in reports[role].items() if k != "pictures"} for role in ROLES}
    sheets: dict[str, list[Path]] = {}
    if detection is not None:
        rows = detection_rows(detection, {role: predictions[role]["detection"] for role in ROLES})
        for role in ROLES:
            report[role]["detection"]["mean_iou"] = _mean([row[f"iou_{role}"] for row in rows])
        report["per_image"] = rows
        changes = [row["iou_change"] for row in rows if row["iou_change"] is not None]
        report["iou_change"] = {
            "mean": _mean(changes),
            "improved": sum(c > 0 for c in changes),
            "worse": sum(c < 0 for c in changes),
            "same": sum(c == 0 for c in changes),
        }
        preds = {role: predictions[role]["detection"] for role in ROLES}
        count = max(pictures, sheet)
        sheets["contact_sheet.png"] = detection_pictures(detection, preds, rows, titles, folder / "pictures", count)
    if vqa:
        answers = {role: [r["prediction"] for r in predictions[role]["vqa"]] for role in ROLES}
        count = max(pictures, sheet)
        sheets["contact_sheet_vqa.png"] = vqa_pictures(vqa, answers, titles, folder / "pictures", count)
    report["pictures"] = [str(p) for paths in sheets.values() for p in paths[:pictures]]
    for name, paths in sheets.items():
        if sheet > 0 and paths:
            contact_sheet([load_training_image(p) for p in paths[:sheet]], columns=2).save(folder / name)
            report.setdefault("contact_sheets", []).append(str(folder / name))
        for extra in paths[pictures:]:
            extra.unlink()  # drawn only for the sheet
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / "report.md").write_text(markdown_report(report))
    return report
