"""The detection answer as a grammar over token ids, applied while generating (both engines use it).

A ``detect`` answer is ``<locY1><locX1><locY2><locX2> label`` objects joined by ``" ; "``, then ``<eos>``;
a ``segment`` answer has 16 ``<segNNN>`` after each box. :class:`DetectionGrammar` follows one answer
token by token and says which tokens may come next, so that whatever the model prefers among them, the
answer parses completely:

- four loc tokens with ``y2 > y1`` and ``x2 > x1`` (the bounds come from the same box's earlier tokens);
- for ``segment``, exactly 16 seg tokens;
- the tokens of one *requested* label, exactly as the tokenizer splits the training text: the text
  between two added (loc/seg) tokens is tokenized on its own, so an object followed by another is
  ``tokens(" label ; ")`` and the last one is ``tokens(" label")`` then ``<eos>``;
- no object (label and four locs) twice; at most ``max_objects`` objects, and none that would not be
  finished within ``max_tokens`` (``<eos>`` included).

:class:`GrammarSpec` is plain data (ints and tuples), so it can travel to vLLM's engine process.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Protocol

from paligemma.tokens import LOC_MAX, NUM_LOC_TOKENS, NUM_SEG_TOKENS, SEG_TOKENS_PER_MASK, SpecialIds

if TYPE_CHECKING:
    import torch

DEFAULT_MAX_OBJECTS = 25
"""Objects per answer when a request does not say (PaliGemma's detection mixtures rarely exceed it)."""

TokenRange = tuple[int, int]
"""Token ids ``start <= id < stop``."""


class GrammarError(ValueError):
    """A token the grammar does not allow was fed to it."""


class EncodesText(Protocol):
    """The slice of a Hugging Face tokenizer the grammar needs."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass(frozen=True)
class GrammarSpec:
    """Everything a :class:`DetectionGrammar` needs, as plain data."""

    loc_start: int
    seg_start: int
    eos: int
    continued: tuple[tuple[int, ...], ...]
    """Per label: its tokens when another object follows (``tokens(" label ; ")``)."""
    last: tuple[tuple[int, ...], ...]
    """Per label: its tokens when the answer ends after it (``tokens(" label")``)."""
    segment: bool = False
    max_objects: int = DEFAULT_MAX_OBJECTS
    max_tokens: int = 1 << 30

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (what crosses into vLLM's engine process).

        Shallow: the fields are ints and tuples already, and ``dataclasses.asdict`` deep-copied them on
        every request (a few percent of the API process's event loop under load).
        """
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GrammarSpec:
        """The spec back from :meth:`to_dict` (sequences may arrive as lists)."""
        values = dict(data)
        for key in ("continued", "last"):
            values[key] = tuple(tuple(int(t) for t in tokens) for tokens in values[key])
        return cls(**values)

    @classmethod
    def build(
        cls,
        tokenizer: EncodesText,
        special: SpecialIds,
        eos: int,
        labels: Sequence[str],
        *,
        segment: bool = False,
        max_objects: int = DEFAULT_MAX_OBJECTS,
        max_tokens: int = 1 << 30,
    ) -> GrammarSpec:
        """The spec for answering ``detect``/``segment`` with ``labels`` (duplicates dropped, order kept)."""
        unique = list(dict.fromkeys(labels))
        if not unique:
            raise ValueError("a detection grammar needs at least one label")
        if max_objects < 1:
            raise ValueError("max_objects must be at least 1")

        def encode(text: str) -> tuple[int, ...]:
            tokens = tuple(int(t) for t in tokenizer.encode(text, add_special_tokens=False))
            if any(t == eos or special.loc(t) is not None or special.seg(t) is not None for t in tokens):
                raise ValueError(f"label text {text.strip()!r} holds a location, segmentation or end token")
            return tokens

        return cls(
            loc_start=special.loc_start,
            seg_start=special.seg_start,
            eos=eos,
            continued=tuple(encode(f" {label} ; ") for label in unique),
            last=tuple(encode(f" {label}") for label in unique),
            segment=segment,
            max_objects=max_objects,
            max_tokens=max_tokens,
        )


@dataclass
class _Node:
    """A node of the label trie: ``ends`` maps (label index, is_last) to nothing, as a set."""

    children: dict[int, _Node] = field(default_factory=dict)
    ends: set[tuple[int, bool]] = field(default_factory=set)
    below: dict[tuple[int, bool], int] = field(default_factory=dict)
    """Every end in this subtree, with how many more tokens reach it."""


def _trie(spec: GrammarSpec) -> _Node:
    root = _Node()
    for is_last, sequences in ((False, spec.continued), (True, spec.last)):
        for label, tokens in enumerate(sequences):
            node = root
            path = [node]
            for token in tokens:
                node = node.children.setdefault(token, _Node())
                path.append(node)
            node.ends.add((label, is_last))
            for depth, ancestor in enumerate(path):
                distance = len(tokens) - depth
                key = (label, is_last)
                ancestor.below[key] = min(distance, ancestor.below.get(key, distance))
    return root


class DetectionGrammar:
    """Follows one answer; :meth:`allowed` are the next tokens, :meth:`advance` takes the one chosen."""

    def __init__(self, spec: GrammarSpec) -> None:
        self.spec = spec
        self._root = _trie(spec)
        self._box_len = 4 + (SEG_TOKENS_PER_MASK if spec.segment else 0)
        self._shortest_last = min(len(t) for t in spec.last)
        self._labels = len(spec.last)
        self._written: dict[tuple[int, ...], set[int]] = {}
        self._count = 0
        self._used = 0
        self._box: list[int] = []
        self._segs = 0
        self._node: _Node | None = None
        self.done = False

    @property
    def objects(self) -> int:
        """Objects written so far."""
        return self._count

    def _left(self) -> int:
        return self.spec.max_tokens - self._used

    def _object_fits(self, left: int) -> bool:
        """Whether a whole further object (box, shortest label, ``<eos>``) fits in ``left`` tokens."""
        return self._count < self.spec.max_objects and self._box_len + self._shortest_last + 1 <= left

    def _end_ok(self, end: tuple[int, bool], distance: int) -> bool:
        """Whether label end ``end``, ``distance`` tokens away, may be written for the current box."""
        label, is_last = end
        if label in self._written.get(tuple(self._box), set()):
            return False
        left = self._left() - distance
        if is_last:
            return left >= 1  # room for <eos>
        self._count += 1  # the object being finished counts against max_objects
        try:
            return self._object_fits(left)
        finally:
            self._count -= 1

    def allowed(self) -> list[TokenRange]:
        """Token ranges that keep the answer valid; empty once it is done."""
        spec = self.spec
        if self.done:
            return []
        eos = [(spec.eos, spec.eos + 1)]
        if self._node is not None:
            ranges = [
                (token, token + 1)
                for token, child in self._node.children.items()
                if any(self._end_ok(end, d + 1) for end, d in child.below.items())
            ]
            if any(self._end_ok(end, 0) for end in self._node.ends if end[1]):
                ranges += eos
            if any(self._end_ok(end, 0) for end in self._node.ends if not end[1]):
                ranges.append((spec.loc_start, spec.loc_start + LOC_MAX))
            return sorted(ranges)
        if len(self._box) == 4:
            return [(spec.seg_start, spec.seg_start + NUM_SEG_TOKENS)]
        if not self._box:
            starts = [(spec.loc_start, spec.loc_start + LOC_MAX)] if self._object_fits(self._left()) else []
            return (eos if self._count == 0 else []) + starts
        if len(self._box) == 1:
            return [(spec.loc_start, spec.loc_start + LOC_MAX)]  # x1 <= 1022 leaves room for x2
        if len(self._box) == 2:
            return [(spec.loc_start + self._box[0] + 1, spec.loc_start + NUM_LOC_TOKENS)]
        return self._x2_ranges()

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` (one row, any vocabulary size) with ``-inf`` on every token :meth:`allowed` excludes."""
        import torch

        keep = torch.full_like(logits, float("-inf"))
        for start, stop in self.allowed():
            keep[start:stop] = 0.0
        return logits + keep

    def _x2_ranges(self) -> list[TokenRange]:
        """``x2 > x1``, minus the values whose box already carries every label."""
        y1, x1, y2 = self._box
        full = sorted(
            box[3] for box, labels in self._written.items() if box[:3] == (y1, x1, y2) and len(labels) == self._labels
        )
        ranges, start = [], x1 + 1
        for x2 in full:
            if x2 >= start:
                if x2 > start:
                    ranges.append((self.spec.loc_start + start, self.spec.loc_start + x2))
                start = x2 + 1
        if start < NUM_LOC_TOKENS:
            ranges.append((self.spec.loc_start + start, self.spec.loc_start + NUM_LOC_TOKENS))
        return ranges

    def advance(self, token: int) -> None:
        """Take the next generated token; :class:`GrammarError` if :meth:`allowed` did not include it."""
        if not any(start <= token < stop for start, stop in self.allowed()):
            raise GrammarError(f"token {token} is not allowed here")
        spec = self.spec
        node = self._node
        if node is not None and token not in node.children:  # <eos>, or a loc that starts the next object
            is_last = token == spec.eos
            label = next(lab for lab, last in sorted(node.ends) if last == is_last and self._end_ok((lab, last), 0))
            self._written.setdefault(tuple(self._box), set()).add(label)
            self._count += 1
            self._box, self._segs, self._node = [], 0, None
        self._used += 1
        if token == spec.eos:
            self.done = True
        elif self._node is not None:
            self._node = self._node.children[token]
        elif len(self._box) < 4:
            self._box.append(token - spec.loc_start)
            if len(self._box) == 4 and not spec.segment:
                self._node = self._root
        else:
            self._segs += 1
            if self._segs == SEG_TOKENS_PER_MASK:
                self._node = self._root
