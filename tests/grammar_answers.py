"""Constrained detection requests and the checks every constrained answer must pass (both engines)."""

from __future__ import annotations

from typing import Any

from paligemma.grammar import GrammarSpec
from paligemma.parsing import objects_started, parse_detection_token_ids
from paligemma.tokens import SpecialIds
from service.engines.protocol import Generation, GenerationRequest

LABEL_SETS = [["red circle", "square"], ["cat"], ["dog", "blue triangle", "house"], ["yellow star", "tree"]]


def constrained_requests(tokenizer: Any, images: list[Any], max_new_tokens: int, segment: bool = False) -> list[Any]:
    """One request per label set and image (label sets differ within the batch), each with its grammar."""
    special = SpecialIds.from_tokenizer(tokenizer)
    task = "segment " if segment else "detect "
    out = []
    for labels in LABEL_SETS:
        spec = GrammarSpec.build(
            tokenizer,
            special,
            tokenizer.eos_token_id,
            labels,
            segment=segment,
            max_objects=4,
            max_tokens=max_new_tokens,
        )
        out += [
            (labels, GenerationRequest(im, task + " ; ".join(labels), max_new_tokens, grammar=spec)) for im in images
        ]
    return out


def check_complete(generation: Generation, labels: list[str], tokenizer: Any, segment: bool = False) -> int:
    """Assert the answer parses completely into distinct, well-formed objects with requested labels;
    returns the number of objects."""
    special = SpecialIds.from_tokenizer(tokenizer)
    ids = list(generation.token_ids)
    detections = parse_detection_token_ids(
        ids, 1000, 1000, special=special, decode=lambda t: str(tokenizer.decode(t, skip_special_tokens=True))
    )
    assert generation.finish_reason == "stop", generation.text  # ended with <eos> within the budget
    assert len(detections) == sum(special.loc(t) is not None for t in ids) // 4, generation.text  # none dropped
    assert {d.label for d in detections} <= set(labels), generation.text
    assert len({(d.label, d.loc_tokens) for d in detections}) == len(detections)
    assert all(y2 > y1 and x2 > x1 for y1, x1, y2, x2 in (d.loc_tokens for d in detections))
    assert all((d.seg_tokens is not None) == segment for d in detections)
    return len(detections)


def dropped(generation: Generation, labels: list[str], tokenizer: Any) -> int:
    """Objects started (runs of loc tokens) that did not become a detection with a requested label."""
    special = SpecialIds.from_tokenizer(tokenizer)
    ids = list(generation.token_ids)
    runs = objects_started(ids, special)
    detections = parse_detection_token_ids(
        ids, 1000, 1000, special=special, decode=lambda t: str(tokenizer.decode(t, skip_special_tokens=True))
    )
    return runs - sum(d.label in labels for d in detections)
