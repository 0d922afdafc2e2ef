"""COCO instance masks -> ``segment <class>`` training examples with ``<loc>`` x4 + ``<seg>`` x16 targets.

Why a loader of its own: a segmentation target needs each object's mask, which :func:`finetune.data.load_coco`
drops. :func:`load_coco_segments` is that loader (same images, categories, boxes, issues and ``on_error``) with
one more check per annotation: its ``segmentation`` must give a mask. Polygons, uncompressed RLE (``counts``
a list) and compressed RLE (``counts`` a string) are read as COCO's own ``annToRLE`` reads them, through
``pycocotools.mask``. An empty segmentation, a polygon of fewer than 3 points, an RLE whose ``size`` is not
the image record's ``[height, width]`` or whose counts do not cover it, a mask of zero area, or one that
does not meet its ``bbox`` becomes a :class:`finetune.data.DataIssue` (file and annotation id): logged and
skipped, or a :class:`finetune.data.DataError` with ``on_error="fail"``. Crowd annotations (``iscrowd``) are
skipped, as ``load_coco`` and COCO evaluation do: one region covering many instances is not an object.

The target follows big_vision (``pp/proj/paligemma/segmentation.py``, op ``refcoco_mask2str``; its RefCOCO
builder ``datasets/refcoco/refcoco.py`` takes ``coco.annToMask(ann)`` and the *annotation's* ``bbox``): the box
is the COCO ``bbox``, written with the detection codec, and the same box crops the mask for the encoder. Per
object ``<locY1><locX1><locY2><locX2><seg>x16 label``, objects in reading order joined by ``" ; "``, as the
PaliGemma mix models answer ``segment a ; b`` and as :mod:`paligemma.parsing` reads it.

Speed: masks are decoded and encoded when examples are built, not at load (memory stays flat), each object
once, in batches through the encoder (:class:`SegmentCodes`): 1,000 masks take seconds.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pycocotools import mask as mask_utils

from finetune.config import TrainConfig
from finetune.data.examples import _loc, prompt_groups, reading_order
from finetune.data.loaders import load_coco
from finetune.data.records import Box, DetectionImage, DetectionSet, Example, OnError
from paligemma import prompts
from paligemma.mask_encoder import MaskEncoder, crop_box, crop_resize
from paligemma.tokens import SEG_TOKENS

log = logging.getLogger(__name__)
Segmentation = list[list[float]] | dict[str, Any]
"""COCO's ``segmentation``: polygons ``[[x1, y1, x2, y2, ...], ...]`` or RLE ``{"size": [h, w], "counts": ...}``."""
ENCODE_BATCH = 256
"""Masks per encoder call: big enough to amortise the call, small enough for a few MB of 64x64 crops."""


@dataclass(frozen=True)
class Segment(Box):
    """A :class:`finetune.data.Box` that also carries its mask as the file gives it (checked at load)."""

    segmentation: Segmentation = field(kw_only=True, compare=False)


def to_rle(segmentation: Segmentation, width: int, height: int) -> dict[str, Any]:
    """One compressed RLE for the mask, exactly as COCO's ``annToRLE`` builds it (polygons merged)."""
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))  # type: ignore[no-any-return]
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)  # type: ignore[no-any-return]
    counts = segmentation["counts"]
    return {"size": list(segmentation["size"]), "counts": counts.encode() if isinstance(counts, str) else counts}


def decode_mask(segmentation: Segmentation, width: int, height: int) -> np.ndarray:
    """``[height, width]`` uint8 mask, 1 inside (the image record's size, in which ``bbox`` is given)."""
    return np.asarray(mask_utils.decode(to_rle(segmentation, width, height)))


def mask_problem(segmentation: Any, width: int, height: int, box: tuple[float, float, float, float]) -> str | None:
    """Why ``segmentation`` cannot be a training mask for ``box`` in a ``width`` x ``height`` record, or None."""
    if not segmentation:
        return "empty segmentation"
    if isinstance(segmentation, list):
        for k, poly in enumerate(segmentation):
            if not isinstance(poly, list) or not all(isinstance(v, int | float) for v in poly):
                return f"polygon {k} must be a list of numbers [x1, y1, x2, y2, ...]"
            if len(poly) < 6 or len(poly) % 2:
                return f"polygon {k} has {len(poly)} coordinates; a polygon needs at least 3 (x, y) points"
    elif isinstance(segmentation, dict):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        if list(size or []) != [height, width]:
            return f"RLE size {size} differs from the image's [height, width] [{height}, {width}]"
        if isinstance(counts, list):
            if not all(isinstance(c, int) and c >= 0 for c in counts) or sum(counts) != width * height:
                return f"uncompressed RLE counts must be non-negative integers summing to {width}x{height}"
        elif not isinstance(counts, str | bytes) or not counts:
            return "RLE counts must be a list (uncompressed) or a non-empty string (compressed)"
    else:
        return f"segmentation must be a list of polygons or an RLE dict, got {type(segmentation).__name__}"
    try:
        rle = to_rle(segmentation, width, height)
        area = int(mask_utils.area(rle))
        mx, my, mw, mh = (float(v) for v in mask_utils.toBbox(rle))
    except (TypeError, ValueError, OverflowError) as exc:
        return f"unreadable segmentation ({exc})"
    if area == 0:
        return "mask has zero area"
    top, left, bottom, right = crop_box(box, width, height)
    if bottom <= top or right <= left:
        return f"bbox {box} covers no whole pixel, so there is no mask crop to encode"
    if mx >= right or my >= bottom or mx + mw <= left or my + mh <= top:
        return f"mask (bbox {[mx, my, mw, mh]}) lies outside the annotation's bbox {box}"
    return None


def load_coco_segments(
    annotations: str | Path,
    image_dir: str | Path | None = None,
    *,
    synonyms: dict[str, str] | None = None,
    on_error: OnError = "skip",
) -> DetectionSet:
    """COCO instance segmentation JSON -> a :class:`finetune.data.DetectionSet` whose objects are
    :class:`Segment` (module docstring). Everything :func:`finetune.data.load_coco` checks is checked too."""

    def check(ann: dict[str, Any], image: DetectionImage, box: Box) -> Box | str:
        problem = mask_problem(ann.get("segmentation"), image.width, image.height, box.box)
        return problem or Segment(box.label, box.box, segmentation=ann["segmentation"])

    return load_coco(annotations, image_dir, synonyms=synonyms, on_error=on_error, annotation_check=check)


class SegmentCodes:
    """Each object's 16 ``<seg>`` tokens, computed once: masks decoded, cropped and encoded in batches.

    Equal to ``encoder.encode_mask(decode_mask(...), obj.box)`` object by object, which would call the
    encoder once per mask.
    """

    def __init__(self, encoder: MaskEncoder, batch_size: int = ENCODE_BATCH) -> None:
        self.encoder, self.batch_size = encoder, batch_size
        self._codes: dict[int, tuple[Segment, str]] = {}
        """``id(obj)`` -> the object itself (which keeps its id from being reused) and its tokens."""

    def prepare(self, images: Iterable[DetectionImage], labels: Sequence[str] | None = None) -> None:
        """Encode every object of ``images`` (of ``labels``, if given) not encoded yet."""
        pending = [
            (image, _segment(o))
            for image in images
            for o in image.objects
            if (labels is None or o.label in labels) and id(o) not in self._codes
        ]
        for start in range(0, len(pending), self.batch_size):
            chunk = pending[start : start + self.batch_size]
            crops = [crop_resize(decode_mask(o.segmentation, im.width, im.height), o.box) for im, o in chunk]
            for (_, obj), row in zip(chunk, self.encoder.encode(np.stack(crops)), strict=True):
                self._codes[id(obj)] = (obj, "".join(SEG_TOKENS[i] for i in row))

    def tokens(self, image: DetectionImage, obj: Box) -> str:
        """The 16 ``<segNNN>`` of ``obj`` (an object of ``image``)."""
        if id(obj) not in self._codes:
            self.prepare([DetectionImage(image.image_id, image.path, image.width, image.height, [obj])])
        return self._codes[id(obj)][1]


def _segment(obj: Box) -> Segment:
    if not isinstance(obj, Segment):
        raise TypeError(f"object {obj} has no mask: load the data with load_coco_segments")
    return obj


def segment_target(
    image: DetectionImage, labels: Sequence[str], encoder: MaskEncoder | SegmentCodes, loc_stride: int = 1
) -> str:
    """Suffix for ``segment <labels>``: ``"<loc>x4<seg>x16 label ; ..."`` in reading order, ``""`` if none.

    The loc tokens are exactly :func:`finetune.data.detection_target`'s for the same box and stride.
    """
    codes = SegmentCodes(encoder) if isinstance(encoder, MaskEncoder) else encoder
    codes.prepare([image], labels)
    w, h, s = image.width, image.height, loc_stride
    parts = []
    for o in reading_order(o for o in image.objects if o.label in labels):
        x1, y1, x2, y2 = o.box
        locs = f"{_loc(y1, h, s)}{_loc(x1, w, s)}{_loc(y2, h, s)}{_loc(x2, w, s)}"
        parts.append(f"{locs}{codes.tokens(image, o)} {o.label}")
    return " ; ".join(parts)


def segment_examples(
    dataset: DetectionSet,
    encoder: MaskEncoder | SegmentCodes,
    absent_per_image: int = 1,
    seed: int = 0,
    loc_stride: int = 1,
    prompt_style: Literal["multi", "per_class"] = "per_class",
) -> list[Example]:
    """``segment <classes>`` prompts chosen as ``detect`` ones are (:func:`finetune.data.prompt_groups`), with
    segmentation targets; one class per prompt unless ``prompt_style="multi"`` (``DataConfig.segment_prompt_style``)."""
    codes = SegmentCodes(encoder) if isinstance(encoder, MaskEncoder) else encoder
    codes.prepare(dataset.images)  # one batched pass over every mask before any target is written
    return [
        Example(image.path, prompts.segment(group), segment_target(image, group, codes, loc_stride))
        for image, group in prompt_groups(dataset, absent_per_image, seed, prompt_style)
    ]


def configured_examples(cfg: TrainConfig) -> list[Example]:
    """``segment`` prompts from ``--segment-coco`` files, every mask encoded once by ``--segmentation-weights``."""
    codes = SegmentCodes(MaskEncoder.from_npz(str(cfg.segmentation_weights)))
    examples: list[Example] = []
    for i, path in enumerate(cfg.segment_coco):
        dataset = load_coco_segments(path, cfg.coco_images, synonyms=cfg.synonym_map, on_error=cfg.on_error)
        examples += segment_examples(
            dataset,
            codes,
            cfg.absent_per_image,
            seed=cfg.seed + i,
            loc_stride=cfg.loc_stride,
            prompt_style=cfg.segment_prompt_style,
        )
        masks = sum(len(image.objects) for image in dataset.images)
        log.info(
            "%s: %d images, %d masks, classes %s, %d skipped",
            path,
            len(dataset.images),
            masks,
            dataset.classes,
            len(dataset.issues),
        )
    return examples
