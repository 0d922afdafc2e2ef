"""Location and segmentation tokens: ``<locNNNN>`` (1024 bins) and ``<segNNN>`` (128 codewords).

Boxes are written ``<locY1><locX1><locY2><locX2>`` (y first). Encoding follows big_vision:
``idx = clip(round(v * 1023), 0, 1023)`` with ``v = y / H`` or ``x / W``; decoding uses the same
constant, ``v = idx / 1023``, so the round trip errs by at most half a bin.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

LOC_MAX = 1023
"""Highest location index; the one constant used to encode and decode boxes."""
NUM_LOC_TOKENS = LOC_MAX + 1
NUM_SEG_TOKENS = 128
SEG_TOKENS_PER_MASK = 16

LOC_TOKENS: tuple[str, ...] = tuple(f"<loc{i:04d}>" for i in range(NUM_LOC_TOKENS))
SEG_TOKENS: tuple[str, ...] = tuple(f"<seg{i:03d}>" for i in range(NUM_SEG_TOKENS))
IMAGE_TOKEN = "<image>"

LOC_PATTERN = re.compile(r"<loc(\d{4})>")
SEG_PATTERN = re.compile(r"<seg(\d{3})>")


def loc_index(value: float, side: float) -> int:
    """Bin of one coordinate: ``clip(round(value / side * 1023), 0, 1023)``, rounding half to even as
    big_vision's ``tf.round`` does."""
    if side <= 0:
        raise ValueError(f"image side must be positive, got {side}")
    return min(max(round(value / side * LOC_MAX), 0), LOC_MAX)


def loc_value(index: int, side: float) -> float:
    """Pixel coordinate of a bin, clamped to ``[0, side]``."""
    return min(max(index / LOC_MAX * side, 0.0), float(side))


def encode_box(x1: float, y1: float, x2: float, y2: float, width: float, height: float) -> str:
    """Pixel box (x right, y down) -> ``<locY1><locX1><locY2><locX2>``."""
    indices = (loc_index(y1, height), loc_index(x1, width), loc_index(y2, height), loc_index(x2, width))
    return "".join(LOC_TOKENS[i] for i in indices)


def encode_detections(
    objects: Iterable[tuple[tuple[float, float, float, float], str]], width: float, height: float
) -> str:
    """Training target for ``detect``: ``"<loc..>x4 label ; <loc..>x4 label"``.

    ``objects`` yields ``((x1, y1, x2, y2), label)`` in pixels; the order is kept as given.
    """
    parts = [f"{encode_box(*box, width, height)} {label}" for box, label in objects]
    return " ; ".join(parts)


class TokenizerLike(Protocol):
    """The slice of a Hugging Face tokenizer the codec needs."""

    def convert_tokens_to_ids(self, tokens: str) -> int | list[int]: ...


@dataclass(frozen=True)
class SpecialIds:
    """Where the loc and seg tokens sit in a vocabulary (read from the tokenizer, never assumed)."""

    loc_start: int
    seg_start: int

    @classmethod
    def from_tokenizer(cls, tokenizer: TokenizerLike) -> SpecialIds:
        """Look up the offsets and check the 1024 loc and 128 seg ids are contiguous."""
        loc = [int(tokenizer.convert_tokens_to_ids(t)) for t in LOC_TOKENS]  # type: ignore[arg-type]
        seg = [int(tokenizer.convert_tokens_to_ids(t)) for t in SEG_TOKENS]  # type: ignore[arg-type]
        for name, ids in (("loc", loc), ("seg", seg)):
            if ids != list(range(ids[0], ids[0] + len(ids))):
                raise ValueError(f"tokenizer's {name} tokens are missing or not contiguous")
        return cls(loc_start=loc[0], seg_start=seg[0])

    def loc(self, token_id: int) -> int | None:
        """Location index of a token id, or None."""
        offset = token_id - self.loc_start
        return offset if 0 <= offset < NUM_LOC_TOKENS else None

    def seg(self, token_id: int) -> int | None:
        """Segmentation codeword of a token id, or None."""
        offset = token_id - self.seg_start
        return offset if 0 <= offset < NUM_SEG_TOKENS else None

    def is_loc_or_seg(self, token_ids: Sequence[int]) -> list[bool]:
        """Per id: is it a loc or seg token."""
        return [self.loc(t) is not None or self.seg(t) is not None for t in token_ids]
