"""Loaded records to training examples: prompts and targets in PaliGemma's text format.

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
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Iterator, Sequence
from typing import Literal

from finetune.data.records import Box, DetectionImage, DetectionSet, Example, VQARecord
from paligemma import prompts
from paligemma.tokens import LOC_MAX, LOC_TOKENS, loc_index

log = logging.getLogger(__name__)


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
