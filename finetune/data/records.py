"""What a dataset is made of, and how a bad record is reported.

Loaded records (:class:`DetectionSet` of :class:`DetectionImage` with :class:`Box` objects, :class:`VQARecord`),
the training :class:`Example` (image, prefix, suffix) they become, and :class:`DataIssue`: every bad record
names its file and line (JSONL) or JSON path (COCO); ``on_error="skip"`` logs it and goes on, ``"fail"``
raises :class:`DataError` at the first. Labels are lower-cased with single spaces and mapped through
``synonyms`` (raw -> canonical) when data is loaded (:func:`normalize_label`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

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
