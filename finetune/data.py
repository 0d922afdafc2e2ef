"""Dataset loaders (COCO detection, big_vision JSONL, VQA JSONL) and the training examples built from them.

Every loader checks each record and never drops one silently: a bad record (missing image, box outside
the image, empty label, broken JSON, missing field) becomes a :class:`DataIssue` naming the file and the
line (JSONL) or the JSON path (COCO). Every distinct image is also checked from its header
(:class:`finetune.images.ImageCheck`: empty, not an allowed format, too many pixels, and for COCO a record
whose width/height do not have the displayed image's shape, e.g. an EXIF-rotated photo). With
``on_error="skip"`` it is logged and skipped, with ``"fail"`` a :class:`DataError` stops loading at the first
one.

Detection targets use the PaliGemma codec (``<locY1><locX1><locY2><locX2> label``, objects joined by
``" ; "``). How a detection image becomes prompts (:func:`detection_examples`), ``prompt_style``:

- ``"multi"`` (default, big_vision's way): one ``detect a ; b ; c`` prompt per image listing the classes
  present plus ``absent_per_image`` sampled absent classes, in random order. The target lists every object
  of the listed classes in reading order (top to bottom, then left to right), each followed by its label, so
  the absent classes simply never appear: the model learns to say nothing for them.
- ``"per_class"``: one ``detect <class>`` prompt per class present (its boxes in reading order) plus
  ``absent_per_image`` prompts for absent classes whose target is empty: the suffix is then just ``<eos>``
  (the processor appends it). Beware with small models trained from scratch: under greedy decoding the
  single ``<eos>`` token competes with a box's first token, which is spread over many neighbouring bins,
  so ``<eos>`` ("absent") can win although the object is clearly there.
- ``loc_stride`` > 1 rounds every loc index to a multiple of the stride (still real ``<locNNNN>`` tokens),
  which concentrates a small model's probability on fewer bins. Stride 16 moves a coordinate by at most 8
  bins (0.9 px on a 112-px image). Keep 1 for real checkpoints, which were pretrained on exact bins.
- Labels are lower-cased with single spaces and mapped through ``synonyms`` (raw -> canonical) when the data
  is loaded, so ``"Sq"`` and ``"square"`` are one class in prompts, targets and evaluation.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from finetune.images import ImageCheck
from paligemma import prompts
from paligemma.tokens import LOC_MAX, LOC_TOKENS, loc_index

log = logging.getLogger(__name__)
OnError = Literal["skip", "fail"]
BOX_TOLERANCE = 1.0
"""Pixels a box may stick out of the image before it counts as outside (rounding in exported files)."""


class DataError(ValueError):
    """A bad record while loading with ``on_error="fail"``; the message names the file and line."""


def data_error_message(exc: BaseException) -> str:
    """The ``FILE: REASON`` text of a :class:`DataError`, also when torch's DataLoader re-raised it from a
    worker: its message is then the worker's whole traceback, whose last unindented ``module.Type: ``
    line holds the original message (a clean one-line error for the command line)."""
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    lines = text.rstrip().splitlines()
    for i in range(len(lines) - 1, -1, -1):
        match = re.match(r"[A-Za-z_][\w.]*: ", lines[i])
        if match:
            return "\n".join([lines[i][match.end() :], *lines[i + 1 :]]).strip()
    return lines[-1].strip()


@dataclass(frozen=True)
class DataIssue:
    """One rejected record."""

    file: str
    where: str
    """``line 12`` for JSONL, ``annotations[3] (id 17)`` for COCO."""
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.where}: {self.reason}"


@dataclass
class Issues:
    """Collects rejected records; raises at once in fail-fast mode."""

    on_error: OnError = "skip"
    found: list[DataIssue] = field(default_factory=list)

    def add(self, file: Path | str, where: str, reason: str) -> None:
        issue = DataIssue(str(file), where, reason)
        if self.on_error == "fail":
            raise DataError(str(issue))
        log.warning("skipping bad record %s", issue)
        self.found.append(issue)


@dataclass(frozen=True)
class Box:
    """One object: pixel box ``(x1, y1, x2, y2)`` (x right, y down) and a canonical label."""

    label: str
    box: tuple[float, float, float, float]
    score: float | None = None


@dataclass
class DetectionImage:
    image_id: int
    path: Path
    width: int
    height: int
    objects: list[Box] = field(default_factory=list)


@dataclass
class DetectionSet:
    """A COCO-style detection set: images with their objects and the ordered list of class names."""

    images: list[DetectionImage]
    classes: list[str]
    issues: list[DataIssue] = field(default_factory=list)

    def only(self, classes: Sequence[str]) -> DetectionSet:
        """The same images with only ``classes`` as categories and ground truth: what ``detect <classes>``
        should find. Other objects stay in the pixels but are not asked for (a diamond under
        ``detect circle ; square`` is neither a miss nor, unless called a square, a false box)."""
        unknown = [c for c in classes if c not in self.classes]
        if unknown:
            raise ValueError(f"classes {unknown} are not in this dataset (it has {self.classes})")
        images = [
            DetectionImage(im.image_id, im.path, im.width, im.height, [o for o in im.objects if o.label in classes])
            for im in self.images
        ]
        return DetectionSet(images, list(dict.fromkeys(classes)), self.issues)


@dataclass(frozen=True)
class VQARecord:
    image: Path
    question: str
    answers: tuple[str, ...]
    """All reference answers (one for synthetic data, ten for VQAv2)."""
    kind: str = ""
    """Optional question type (the record's ``"type"``), for per-type accuracy."""


@dataclass(frozen=True)
class Example:
    """One training example in the big_vision contract: image, prefix (prompt), suffix (target)."""

    image: Path
    prefix: str
    suffix: str


def normalize_label(label: str, synonyms: dict[str, str] | None = None) -> str:
    """Lower-case, collapse spaces, then map through ``synonyms`` (keys normalised the same way)."""
    clean = " ".join(str(label).lower().split())
    if synonyms:
        table = {" ".join(k.lower().split()): v for k, v in synonyms.items()}
        clean = " ".join(table.get(clean, clean).lower().split())
    return clean


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
    (e.g. one carrying its mask, :mod:`finetune.segment_data`) or the reason to report it as an issue.
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
            if annotation_check is not None:  # e.g. finetune.segment_data: the object with its mask, or why not
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


def reading_order(objects: Iterable[Box]) -> list[Box]:
    """Top to bottom, then left to right: one fixed order, so the target is a function of the image."""
    return sorted(objects, key=lambda o: (round(o.box[1]), round(o.box[0])))


def _loc(value: float, side: float, stride: int) -> str:
    index = loc_index(value, side)
    return LOC_TOKENS[min(round(index / stride) * stride, LOC_MAX)]


def detection_target(image: DetectionImage, labels: Sequence[str], loc_stride: int = 1) -> str:
    """Suffix for ``detect <labels>``: their boxes in reading order, or ``""`` when none is in the image.

    ``"<locY1><locX1><locY2><locX2> label ; ..."``, exactly as ``paligemma.tokens.encode_detections`` writes
    it when ``loc_stride`` is 1.
    """
    w, h, s = image.width, image.height, loc_stride
    parts = []
    for o in reading_order(o for o in image.objects if o.label in labels):
        x1, y1, x2, y2 = o.box
        parts.append(f"{_loc(y1, h, s)}{_loc(x1, w, s)}{_loc(y2, h, s)}{_loc(x2, w, s)} {o.label}")
    return " ; ".join(parts)


def detection_examples(
    dataset: DetectionSet,
    absent_per_image: int = 1,
    seed: int = 0,
    loc_stride: int = 1,
    prompt_style: Literal["multi", "per_class"] = "multi",
) -> list[Example]:
    """Prompts for the classes present plus ``absent_per_image`` sampled absent classes (module docstring)."""
    return [
        Example(image.path, prompts.detect(group), detection_target(image, group, loc_stride))
        for image, group in prompt_groups(dataset, absent_per_image, seed, prompt_style)
    ]


def prompt_groups(
    dataset: DetectionSet,
    absent_per_image: int = 1,
    seed: int = 0,
    prompt_style: Literal["multi", "per_class"] = "multi",
) -> Iterator[tuple[DetectionImage, list[str]]]:
    """The classes each prompt asks for, per image: those present plus ``absent_per_image`` sampled absent
    ones; ``"multi"``: shuffled, at most ``prompts.MAX_OBJECTS`` per prompt; ``"per_class"``: one each."""
    rng = random.Random(seed)
    for image in dataset.images:
        present = list(dict.fromkeys(o.label for o in image.objects))
        absent = [c for c in dataset.classes if c not in present]
        chosen = present + rng.sample(absent, min(absent_per_image, len(absent)))
        if prompt_style == "per_class":
            groups = [[c] for c in chosen]
        else:
            rng.shuffle(chosen)
            groups = [chosen[i : i + prompts.MAX_OBJECTS] for i in range(0, len(chosen), prompts.MAX_OBJECTS)]
        for group in groups:
            yield image, group


def majority_answer(answers: Sequence[str]) -> str:
    """The training target for a VQA record: the most frequent reference answer (first on ties)."""
    counts: dict[str, int] = {}
    for a in answers:
        counts[a] = counts.get(a, 0) + 1
    return max(counts, key=lambda a: counts[a])


def vqa_examples(records: Iterable[VQARecord]) -> list[Example]:
    """``answer en <question>`` -> the majority answer."""
    return [Example(r.image, prompts.answer(r.question), majority_answer(r.answers)) for r in records]
