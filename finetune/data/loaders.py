"""Dataset loaders: COCO detection, big_vision JSONL and VQA JSONL files to records (:mod:`finetune.data.records`).

Every loader checks each record and never drops one silently: a bad record (missing image, box outside
the image, empty label, broken JSON, missing field) becomes a :class:`DataIssue` naming the file and the
line (JSONL) or the JSON path (COCO). Every distinct image is also checked from its header
(:class:`finetune.data.images.ImageCheck`: empty, not an allowed format, too many pixels, and for COCO a record
whose width/height do not have the displayed image's shape, e.g. an EXIF-rotated photo). With
``on_error="skip"`` it is logged and skipped, with ``"fail"`` a :class:`DataError` stops loading at the first
one.

Labels are lower-cased with single spaces and mapped through ``synonyms`` (raw -> canonical) when the data
is loaded, so ``"Sq"`` and ``"square"`` are one class in prompts, targets and evaluation.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from finetune.data.images import ImageCheck
from finetune.data.records import (
    BOX_TOLERANCE,
    Box,
    DetectionImage,
    DetectionSet,
    Example,
    Issues,
    OnError,
    VQARecord,
    normalize_label,
)

log = logging.getLogger(__name__)


def _read_jsonl(path: Path, issues: Issues) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                issues.add(path, f"line {number}", f"invalid JSON ({exc.msg})")
                continue
            if not isinstance(record, dict):
                issues.add(path, f"line {number}", "a line must be a JSON object")
                continue
            yield number, record


def _image_path(value: Any, root: Path) -> Path | None:
    if not isinstance(value, str) or not value.strip():
        return None
    path = Path(value)
    return path if path.is_absolute() else root / path


def load_coco(
    annotations: str | Path,
    image_dir: str | Path | None = None,
    *,
    synonyms: dict[str, str] | None = None,
    on_error: OnError = "skip",
    annotation_check: Callable[[dict[str, Any], DetectionImage, Box], Box | str] | None = None,
) -> DetectionSet:
    """COCO detection JSON (``images``, ``annotations`` with ``bbox`` = x, y, w, h, ``categories``).

    Images are ``image_dir / file_name`` (default: the annotation file's folder). Crowd annotations are
    skipped like in COCO evaluation practice; images without annotations are kept (all classes absent).
    ``annotation_check(ann, image, box)`` sees each accepted annotation and returns the object to keep
    (e.g. one carrying its mask, :mod:`finetune.data.segments`) or the reason to report it as an issue.
    """
    path = Path(annotations)
    root = Path(image_dir) if image_dir is not None else path.parent
    issues, check = Issues(on_error), ImageCheck()
    data = json.loads(path.read_text(encoding="utf-8"))
    names: dict[int, str] = {}
    for i, cat in enumerate(data.get("categories", [])):
        name = normalize_label(cat.get("name", ""), synonyms)
        if not name:
            issues.add(path, f"categories[{i}] (id {cat.get('id')})", "empty label")
            continue
        names[int(cat["id"])] = name
    images: dict[int, DetectionImage] = {}
    declared = {int(img.get("id", -1)) for img in data.get("images", [])}
    for i, img in enumerate(data.get("images", [])):
        where = f"images[{i}] (id {img.get('id')})"
        image_path = _image_path(img.get("file_name"), root)
        width, height = int(img.get("width") or 0), int(img.get("height") or 0)
        if image_path is None or not image_path.is_file():
            issues.add(path, where, f"missing image {image_path or img.get('file_name')!r}")
        elif width <= 0 or height <= 0:
            issues.add(path, where, "width and height must be positive")
        elif problem := check(image_path, (width, height)):
            issues.add(path, where, problem)
        else:
            images[int(img["id"])] = DetectionImage(int(img["id"]), image_path, width, height)
    for i, ann in enumerate(data.get("annotations", [])):
        where = f"annotations[{i}] (id {ann.get('id')})"
        image = images.get(int(ann.get("image_id", -1)))
        if image is None:  # an image already reported as bad needs no second report
            if int(ann.get("image_id", -1)) not in declared:
                issues.add(path, where, f"unknown image_id {ann.get('image_id')}")
            continue
        if ann.get("iscrowd", 0):
            continue
        label = names.get(int(ann.get("category_id", -1)), "")
        bbox = ann.get("bbox") or []
        if not label:
            issues.add(path, where, f"empty label (category_id {ann.get('category_id')})")
        elif len(bbox) != 4 or bbox[2] <= 0 or bbox[3] <= 0:
            issues.add(path, where, f"bbox must be [x, y, w, h] with w, h > 0, got {bbox}")
        elif not _inside(bbox, image.width, image.height):
            issues.add(path, where, f"box {bbox} is outside the {image.width}x{image.height} image")
        else:
            x, y, w, h = (float(v) for v in bbox)
            box = (max(x, 0.0), max(y, 0.0), min(x + w, image.width), min(y + h, image.height))
            obj: Box | str = Box(label, box)
            if annotation_check is not None:  # e.g. finetune.data.segments: the object with its mask, or why not
                obj = annotation_check(ann, image, Box(label, box))
            if isinstance(obj, str):
                issues.add(path, where, obj)
            else:
                image.objects.append(obj)
    classes = list(dict.fromkeys(names.values()))
    return DetectionSet(list(images.values()), classes, issues.found)


def _inside(bbox: Sequence[float], width: int, height: int) -> bool:
    x, y, w, h = bbox
    tol = BOX_TOLERANCE
    return x >= -tol and y >= -tol and x + w <= width + tol and y + h <= height + tol


def load_jsonl(path: str | Path, image_dir: str | Path | None = None, *, on_error: OnError = "skip") -> list[Example]:
    """big_vision / maestro JSONL: ``{"image": ..., "prefix": ..., "suffix": ...}`` per line."""
    path = Path(path)
    root = Path(image_dir) if image_dir is not None else path.parent
    issues, check = Issues(on_error), ImageCheck()
    out: list[Example] = []
    for number, rec in _read_jsonl(path, issues):
        where = f"line {number}"
        image = _image_path(rec.get("image"), root)
        prefix, suffix = rec.get("prefix"), rec.get("suffix")
        if image is None or not image.is_file():
            issues.add(path, where, f"missing image {rec.get('image')!r}")
        elif problem := check(image):
            issues.add(path, where, problem)
        elif not isinstance(prefix, str) or not prefix.strip():
            issues.add(path, where, "empty or missing prefix")
        elif not isinstance(suffix, str):
            issues.add(path, where, 'suffix must be a string (use "" for an empty target)')
        else:
            out.append(Example(image, prefix.strip(), suffix.strip()))
    return out


def load_vqa(path: str | Path, image_dir: str | Path | None = None, *, on_error: OnError = "skip") -> list[VQARecord]:
    """VQA JSONL: ``{"image", "question", "answer"}`` or ``{"image", "question", "answers": [...]}``."""
    path = Path(path)
    root = Path(image_dir) if image_dir is not None else path.parent
    issues, check = Issues(on_error), ImageCheck()
    out: list[VQARecord] = []
    for number, rec in _read_jsonl(path, issues):
        where = f"line {number}"
        image = _image_path(rec.get("image"), root)
        question = rec.get("question")
        raw = rec.get("answers", [rec["answer"]] if "answer" in rec else [])
        answers = tuple(str(a).strip() for a in raw if isinstance(a, str | int | float) and str(a).strip())
        if image is None or not image.is_file():
            issues.add(path, where, f"missing image {rec.get('image')!r}")
        elif problem := check(image):
            issues.add(path, where, problem)
        elif not isinstance(question, str) or not question.strip():
            issues.add(path, where, "empty or missing question")
        elif not answers:
            issues.add(path, where, "no answer: give 'answer' or a non-empty 'answers' list")
        else:
            kind = str(rec.get("type") or "")
            out.append(VQARecord(image, " ".join(question.split()), answers, kind))
    return out
