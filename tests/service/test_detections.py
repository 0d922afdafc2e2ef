"""Boxes and labels of ``/detect`` from real token ids of the tiny tokenizer (random weights never emit
loc tokens, so the conversion is tested here on ids written by hand)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from paligemma import SpecialIds
from service.api.detections import build_detections
from service.engines.protocol import Generation


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint: Path) -> Any:
    from transformers import PaliGemmaProcessor

    return PaliGemmaProcessor.from_pretrained(tiny_checkpoint).tokenizer


def _generation(tokenizer: Any, text: str, logprob: float = math.log(0.5)) -> Generation:
    ids = tuple(tokenizer.encode(text, add_special_tokens=False))
    return Generation(token_ids=ids, text=text, logprobs=(logprob,) * len(ids), finish_reason="stop")


def test_boxes_in_pixels_and_scores(tokenizer: Any) -> None:
    generation = _generation(
        tokenizer, "<loc0256><loc0128><loc1023><loc1023> cat ; <loc0000><loc0000><loc0511><loc0511> dog"
    )
    detections, dropped = build_detections(
        generation, 200, 40, ["cat", "dog"], SpecialIds.from_tokenizer(tokenizer), tokenizer
    )
    assert dropped == 0
    assert [d.label for d in detections] == ["cat", "dog"]
    cat = detections[0]
    assert (cat.box.x1, cat.box.y1, cat.box.x2, cat.box.y2) == pytest.approx((25.02, 10.01, 200.0, 40.0), abs=0.01)
    assert (cat.box_normalized.x1, cat.box_normalized.y2) == pytest.approx((128 / 1023, 1.0), abs=1e-5)
    assert cat.score == pytest.approx(0.5)  # geometric mean of equal probabilities


def test_missing_label_named_after_the_single_object(tokenizer: Any) -> None:
    special = SpecialIds.from_tokenizer(tokenizer)
    generation = _generation(tokenizer, "<loc0100><loc0100><loc0200><loc0200>")
    named, dropped = build_detections(generation, 100, 100, ["dog"], special, tokenizer)
    assert [d.label for d in named] == ["dog"] and dropped == 0
    unnamed, dropped = build_detections(generation, 100, 100, ["dog", "cat"], special, tokenizer)
    assert unnamed == [] and dropped == 1


def test_unrequested_labels_are_kept_and_malformed_groups_dropped(tokenizer: Any) -> None:
    special = SpecialIds.from_tokenizer(tokenizer)
    generation = _generation(tokenizer, "<loc0100><loc0100><loc0200><loc0200> horse ; <loc0300><loc0300> cat")
    detections, _ = build_detections(generation, 100, 100, ["cat"], special, tokenizer)
    assert [d.label for d in detections] == ["horse"]
