"""Model output -> detections, from text or from token ids. Never raises on model output.

The grammar is ``<loc>x4 [<seg>x16] label`` objects joined by ``" ; "``. What the model really emits is
messier, so the parser is lenient and decides each malformed case once:

- fewer or more than 4 loc tokens in a row: the object is dropped (cut at ``max_tokens``, run-away output);
- ``y2 <= y1`` or ``x2 <= x1``: dropped (big_vision's validity check);
- a seg run that is not exactly 16 tokens: the box is kept, ``seg_tokens`` is None;
- missing label: kept with ``label=None`` (the caller decides; the service names it when one object was asked);
- ``<eos>``/``<pad>``/``<bos>`` remnants, stray spaces and trailing ``" ;"``: ignored;
- the same label and box repeated: kept once.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from paligemma.tokens import LOC_MAX as _LOC_MAX
from paligemma.tokens import (
    LOC_PATTERN,
    SEG_PATTERN,
    SEG_TOKENS_PER_MASK,
    SpecialIds,
    loc_value,
)

REMNANTS = ("<eos>", "<pad>", "<bos>", "<end_of_turn>", "<unk>")
_TOKEN_PATTERN = f"{LOC_PATTERN.pattern}|{SEG_PATTERN.pattern}"

Box = tuple[float, float, float, float]


@dataclass
class Detection:
    """One object: pixel box ``(x1, y1, x2, y2)`` with x right and y down, clipped to the image."""

    label: str | None
    box: Box
    box_normalized: Box
    loc_tokens: tuple[int, int, int, int]
    """Raw bins in model order ``(y1, x1, y2, x2)``."""
    seg_tokens: tuple[int, ...] | None = None
    """The 16 codewords of a ``segment`` output, for the mask decoder."""
    mask: Any | None = None
    score: float | None = None
    token_positions: tuple[int, ...] = field(default=(), repr=False)
    """Positions of this object's loc and label tokens in the generated ids (for scoring)."""


@dataclass(frozen=True)
class _Symbol:
    kind: Literal["loc", "seg", "text"]
    value: int | str
    positions: tuple[int, ...] = ()


def _clean_label(text: str) -> str | None:
    for remnant in REMNANTS:
        text = text.replace(remnant, " ")
    label = " ".join(text.split(";", 1)[0].split())
    return label or None


def _group(symbols: list[_Symbol], width: float, height: float) -> list[Detection]:
    """Core grammar shared by the text and the token-id parsers."""
    symbols = [s for s in symbols if not (s.kind == "text" and not str(s.value).strip())]
    detections: list[Detection] = []
    seen: set[tuple[str | None, tuple[int, ...]]] = set()
    i, n = 0, len(symbols)
    while i < n:
        if symbols[i].kind != "loc":
            i += 1
            continue
        locs: list[_Symbol] = []
        while i < n and symbols[i].kind == "loc":
            locs.append(symbols[i])
            i += 1
        segs: list[int] = []
        while i < n and symbols[i].kind == "seg":
            segs.append(int(symbols[i].value))
            i += 1
        label: str | None = None
        label_positions: tuple[int, ...] = ()
        if i < n and symbols[i].kind == "text":
            label, label_positions = _clean_label(str(symbols[i].value)), symbols[i].positions
            i += 1
        if len(locs) != 4:
            continue
        y1, x1, y2, x2 = (int(s.value) for s in locs)
        if y2 <= y1 or x2 <= x1 or (label, (y1, x1, y2, x2)) in seen:
            continue
        seen.add((label, (y1, x1, y2, x2)))
        detections.append(
            Detection(
                label=label,
                box=(
                    loc_value(x1, width),
                    loc_value(y1, height),
                    loc_value(x2, width),
                    loc_value(y2, height),
                ),
                box_normalized=(x1 / _LOC_MAX, y1 / _LOC_MAX, x2 / _LOC_MAX, y2 / _LOC_MAX),
                loc_tokens=(y1, x1, y2, x2),
                seg_tokens=tuple(segs) if len(segs) == SEG_TOKENS_PER_MASK else None,
                token_positions=tuple(p for s in locs for p in s.positions) + tuple(label_positions),
            )
        )
    return detections


def parse_detections(text: str, width: float, height: float) -> list[Detection]:
    """Parse ``detect``/``segment`` output text into detections in pixels of a ``width`` x ``height`` image."""
    if not isinstance(text, str) or width <= 0 or height <= 0:
        return []
    symbols: list[_Symbol] = []
    cursor = 0
    for match in re.finditer(_TOKEN_PATTERN, text):
        if match.start() > cursor:
            symbols.append(_Symbol("text", text[cursor : match.start()]))
        if match.group(1) is not None:
            symbols.append(_Symbol("loc", int(match.group(1))))
        else:
            symbols.append(_Symbol("seg", int(match.group(2))))
        cursor = match.end()
    if cursor < len(text):
        symbols.append(_Symbol("text", text[cursor:]))
    return _group(symbols, width, height)


def parse_detection_token_ids(
    token_ids: Sequence[int],
    width: float,
    height: float,
    *,
    special: SpecialIds,
    decode: Callable[[list[int]], str],
    logprobs: Sequence[float] | None = None,
) -> list[Detection]:
    """Parse generated token ids (robust against detokenizer spacing).

    ``decode`` turns a run of ordinary ids into text (e.g. ``tokenizer.decode``). With ``logprobs`` (one per
    generated token), each detection gets ``score`` = geometric mean of the probabilities of its 4 loc
    tokens and its label tokens, i.e. ``exp(mean(logprob))``.
    """
    if width <= 0 or height <= 0:
        return []
    symbols: list[_Symbol] = []
    run: list[int] = []
    for position, token_id in enumerate([*token_ids, None]):
        loc = special.loc(token_id) if token_id is not None else None
        seg = special.seg(token_id) if token_id is not None else None
        if token_id is not None and loc is None and seg is None:
            run.append(position)
            continue
        if run:
            ids = [int(token_ids[p]) for p in run]
            symbols.append(_Symbol("text", decode(ids), _label_positions(run, ids, decode)))
            run = []
        if loc is not None:
            symbols.append(_Symbol("loc", loc, (position,)))
        elif seg is not None:
            symbols.append(_Symbol("seg", seg, (position,)))
    detections = _group(symbols, width, height)
    if logprobs is not None:
        for det in detections:
            det.score = score_from_logprobs([logprobs[p] for p in det.token_positions if p < len(logprobs)])
    return detections


def objects_started(token_ids: Sequence[int], special: SpecialIds) -> int:
    """Runs of loc tokens in generated ids: objects the model began, whole or not (what a parse may drop)."""
    is_loc = [special.loc(t) is not None for t in token_ids]
    return sum(1 for i, loc in enumerate(is_loc) if loc and (i == 0 or not is_loc[i - 1]))


def _label_positions(run: list[int], ids: list[int], decode: Callable[[list[int]], str]) -> tuple[int, ...]:
    """Positions of the label's own tokens in a text run: up to the first ``;``, no blanks or remnants."""
    positions = []
    for position, token_id in zip(run, ids, strict=True):
        piece = decode([token_id])
        if ";" in piece:
            break
        if piece.strip() and piece.strip() not in REMNANTS:
            positions.append(position)
    return tuple(positions)


def score_from_logprobs(logprobs: Sequence[float]) -> float | None:
    """Geometric mean of token probabilities, ``exp(mean(logprobs))``; None when there are none."""
    values = [lp for lp in logprobs if not math.isnan(lp)]
    if not values:
        return None
    return math.exp(sum(values) / len(values))  # exp(-inf) == 0.0: a token the model ruled out
