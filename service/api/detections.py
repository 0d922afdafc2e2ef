"""Generated token ids -> the ``detections`` of a ``/detect`` response.

Parsing works on token ids (not text) so detokenizer spacing cannot break boxes, and so each detection
knows which generated tokens it came from: its ``score`` is ``exp(mean(logprob))`` over its 4 loc tokens
and its label tokens, the geometric mean of their probabilities (``paligemma.parse_detection_token_ids``).

Labels: a detection without a label is named after the requested object when exactly one object was
asked for, and dropped otherwise (there is no way to tell which one it was). Labels the model produced
that were not among the requested objects are kept as they are: fine-tuned models may use synonyms,
and silently dropping them hides model behaviour from the caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from paligemma import Detection as ParsedDetection
from paligemma import SpecialIds, parse_detection_token_ids
from service.api.schemas import Box, Detection
from service.engines.protocol import Generation


def labelled_detections(
    generation: Generation,
    width: int,
    height: int,
    objects: Sequence[str],
    special: SpecialIds,
    tokenizer: Any,
) -> tuple[list[ParsedDetection], int]:
    """Parsed detections (pixels of a ``width`` x ``height`` image) that have a label, and how many had none."""

    def decode(ids: list[int]) -> str:
        return str(tokenizer.decode(ids, skip_special_tokens=True))

    parsed = parse_detection_token_ids(
        generation.token_ids, width, height, special=special, decode=decode, logprobs=generation.logprobs
    )
    kept: list[ParsedDetection] = []
    for det in parsed:
        if det.label is None and len(objects) == 1:
            det.label = objects[0]
        if det.label is not None:
            kept.append(det)
    return kept, len(parsed) - len(kept)


def to_response(det: ParsedDetection) -> Detection:
    """One parsed detection as it appears in a response (pixels to 0.01, normalized to 1e-5)."""
    x1, y1, x2, y2 = det.box
    nx1, ny1, nx2, ny2 = det.box_normalized
    return Detection(
        label=det.label or "",
        box=Box(x1=round(x1, 2), y1=round(y1, 2), x2=round(x2, 2), y2=round(y2, 2)),
        box_normalized=Box(x1=round(nx1, 5), y1=round(ny1, 5), x2=round(nx2, 5), y2=round(ny2, 5)),
        score=None if det.score is None else round(det.score, 5),
    )


def build_detections(
    generation: Generation,
    width: int,
    height: int,
    objects: Sequence[str],
    special: SpecialIds,
    tokenizer: Any,
) -> tuple[list[Detection], int]:
    """Response detections (pixels of a ``width`` x ``height`` image) and how many were dropped."""
    kept, dropped = labelled_detections(generation, width, height, objects, special, tokenizer)
    return [to_response(det) for det in kept], dropped
