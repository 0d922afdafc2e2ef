"""The detection grammar (paligemma/grammar.py): property tests over label sets and tokenizers.

Two tokenizers: the tiny checkpoint's BPE (Gemma-style, byte fallback) and a one-id-per-character one,
both splitting text around the added loc/seg tokens as Hugging Face tokenizers do. For random label sets:
the tokenization the model is trained on is accepted; every path the grammar allows ends within its
token budget in an answer that parses completely into distinct, well-formed objects with requested labels.
"""

from __future__ import annotations

import functools
import random
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paligemma.grammar import DetectionGrammar, GrammarError, GrammarSpec
from paligemma.parsing import parse_detection_token_ids
from paligemma.tokens import LOC_TOKENS, SEG_TOKENS, SpecialIds

_ADDED = re.compile(r"(<loc\d{4}>|<seg\d{3}>)")


class CharTokenizer:
    """One id per character; loc and seg tokens are added tokens, as in PaliGemma's vocabulary."""

    eos_token_id = 1

    def __init__(self) -> None:
        self._added = {t: 1000 + i for i, t in enumerate(LOC_TOKENS + SEG_TOKENS)}
        self._names = {i: t for t, i in self._added.items()}

    def convert_tokens_to_ids(self, token: str) -> int:
        return self._added[token]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids: list[int] = []
        for piece in _ADDED.split(text):
            ids += [self._added[piece]] if piece in self._added else [10 + ord(c) for c in piece]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self._names.get(i, chr(i - 10) if i >= 10 else "") for i in ids)


@functools.cache
def _tokenizer(kind: str) -> Any:
    if kind == "chars":
        return CharTokenizer()
    from paligemma.checkpoint import build_tokenizer

    return build_tokenizer()


LABEL = st.text(alphabet="abcdeiorstu ", min_size=1, max_size=12).map(lambda t: " ".join(t.split())).filter(bool)
LABELS = st.lists(LABEL, min_size=1, max_size=5, unique=True)
TOKENIZERS = st.sampled_from(["bpe", "chars"])


def _spec(kind: str, labels: list[str], **kwargs: Any) -> tuple[Any, SpecialIds, GrammarSpec]:
    tokenizer = _tokenizer(kind)
    special = SpecialIds.from_tokenizer(tokenizer)
    return tokenizer, special, GrammarSpec.build(tokenizer, special, tokenizer.eos_token_id, labels, **kwargs)


@st.composite
def _answers(draw: st.DrawFn) -> tuple[list[str], list[tuple[tuple[int, int, int, int], list[int], str]]]:
    """A label set and distinct objects (box in model order, 16 seg codes, requested label)."""
    labels = draw(LABELS)
    objects, seen = [], set()
    for _ in range(draw(st.integers(0, 4))):
        y1, x1 = draw(st.integers(0, 1022)), draw(st.integers(0, 1022))
        box = (y1, x1, draw(st.integers(y1 + 1, 1023)), draw(st.integers(x1 + 1, 1023)))
        label = draw(st.sampled_from(labels))
        if (box, label) not in seen:
            seen.add((box, label))
            objects.append((box, draw(st.lists(st.integers(0, 127), min_size=16, max_size=16)), label))
    return labels, objects


@settings(max_examples=60, deadline=None)
@given(answer=_answers(), kind=TOKENIZERS, segment=st.booleans())
def test_the_training_tokenization_is_accepted(answer: Any, kind: str, segment: bool) -> None:
    labels, objects = answer
    tokenizer, _, spec = _spec(kind, labels, segment=segment)
    text = " ; ".join(
        "".join(LOC_TOKENS[v] for v in box) + ("".join(SEG_TOKENS[c] for c in segs) if segment else "") + " " + label
        for box, segs, label in objects
    )
    grammar = DetectionGrammar(spec)
    for token in [*tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]:
        assert any(a <= token < b for a, b in grammar.allowed()), (text, token)
        grammar.advance(token)
    assert grammar.done and grammar.objects == len(objects)


@settings(max_examples=60, deadline=None)
@given(
    labels=LABELS,
    kind=TOKENIZERS,
    segment=st.booleans(),
    max_objects=st.integers(1, 6),
    max_tokens=st.integers(1, 120),
    seed=st.integers(0, 2**16),
)
def test_every_allowed_path_ends_in_an_answer_that_parses_completely(
    labels: list[str], kind: str, segment: bool, max_objects: int, max_tokens: int, seed: int
) -> None:
    tokenizer, special, spec = _spec(kind, labels, segment=segment, max_objects=max_objects, max_tokens=max_tokens)
    grammar, rng, ids = DetectionGrammar(spec), random.Random(seed), []
    while not grammar.done:
        ranges = grammar.allowed()
        assert ranges, ids  # never stuck before the end
        start, stop = rng.choice(ranges)
        token = rng.randrange(start, stop)
        grammar.advance(token)
        ids.append(token)
    assert len(ids) <= max_tokens and ids[-1] == tokenizer.eos_token_id
    body = ids[:-1]
    detections = parse_detection_token_ids(
        body, 1000, 1000, special=special, decode=lambda t: tokenizer.decode(t, skip_special_tokens=True)
    )
    loc_runs = sum(1 for t in body if special.loc(t) is not None) // 4
    assert len(detections) == grammar.objects == loc_runs <= max_objects
    assert {d.label for d in detections} <= set(labels)
    assert len({(d.label, d.loc_tokens) for d in detections}) == len(detections)
    assert all(y2 > y1 and x2 > x1 for y1, x1, y2, x2 in (d.loc_tokens for d in detections))
    assert all((d.seg_tokens is not None) == segment for d in detections)


def test_a_repeated_object_and_a_token_outside_the_grammar_are_refused() -> None:
    tokenizer, special, spec = _spec("chars", ["cat"], max_objects=5)
    grammar = DetectionGrammar(spec)
    box = [special.loc_start + v for v in (10, 20, 30, 40)]
    for token in [*box, *tokenizer.encode(" cat ; ")]:
        grammar.advance(token)
    for token in box[:3]:
        grammar.advance(token)
    # the same box with the only label is written already: x2 = 40 is ruled out, 39 and 41 are not
    allowed = grammar.allowed()
    assert not any(a <= box[3] < b for a, b in allowed)
    assert any(a <= box[3] + 1 < b for a, b in allowed) and any(a <= box[3] - 1 < b for a, b in allowed)
    with pytest.raises(GrammarError):
        grammar.advance(box[3])
    with pytest.raises(GrammarError):
        DetectionGrammar(spec).advance(special.loc_start + 1023)  # y1 = 1023 leaves no room for y2


def test_max_objects_ends_the_answer() -> None:
    tokenizer, special, spec = _spec("chars", ["cat", "dog"], max_objects=1)
    grammar = DetectionGrammar(spec)
    for token in [special.loc_start + v for v in (1, 2, 3, 4)] + tokenizer.encode(" cat"):
        grammar.advance(token)
    assert grammar.allowed() == [(tokenizer.eos_token_id, tokenizer.eos_token_id + 1)]


def test_labels_that_hold_location_tokens_are_refused() -> None:
    with pytest.raises(ValueError, match="location"):
        _spec("chars", ["cat <loc0001>"])
