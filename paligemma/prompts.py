"""Task prefixes (prompts) for PaliGemma, with validation of user text.

The prefix is what the model conditions on; it never ends with ``"\\n"`` because both the transformers
processor and vLLM append the separator themselves. User-supplied object names and questions are
validated before they reach a prefix: ``;`` would change the object list, a newline would end the prefix
early and ``<`` could smuggle in a real ``<locNNNN>`` token.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

MAX_TEXT_CHARS = 500
"""Longest question/answer/object name accepted (characters)."""
MAX_OBJECTS = 50
"""Most object names in one ``detect``/``segment`` prompt."""
MAX_PREFIX_CHARS = 2000
"""Longest full prefix accepted (characters)."""

_LANG = re.compile(r"^[a-z]{2,3}(?:[-_][A-Za-z]{2,4})?$")
_FORBIDDEN = {";": "';'", "\n": "a newline", "\r": "a newline", "<": "'<'", ">": "'>'"}


class PromptError(ValueError):
    """User text that cannot be turned into a PaliGemma prefix; the message says what to fix."""


def _clean(text: str, what: str) -> str:
    if not isinstance(text, str):
        raise PromptError(f"{what} must be a string")
    for char, name in _FORBIDDEN.items():
        if char in text:
            raise PromptError(f"{what} must not contain {name}: {text[:60]!r}")
    if any(ord(c) < 32 or c == "\x7f" for c in text):
        raise PromptError(f"{what} must not contain control characters")
    cleaned = " ".join(text.split())
    if not cleaned:
        raise PromptError(f"{what} must not be empty")
    if len(cleaned) > MAX_TEXT_CHARS:
        raise PromptError(f"{what} is {len(cleaned)} characters long; the limit is {MAX_TEXT_CHARS}")
    return cleaned


def _lang(lang: str) -> str:
    if not isinstance(lang, str) or not _LANG.match(lang):
        raise PromptError(f"lang must be a language code such as 'en' or 'pt-BR', got {lang!r}")
    return lang


def _finish(prefix: str) -> str:
    if len(prefix) > MAX_PREFIX_CHARS:
        raise PromptError(f"prompt is {len(prefix)} characters long; the limit is {MAX_PREFIX_CHARS}")
    return prefix


def caption(lang: str = "en") -> str:
    """Short caption: ``caption {lang}``."""
    return f"caption {_lang(lang)}"


def describe(lang: str = "en") -> str:
    """Long caption: ``describe {lang}``."""
    return f"describe {_lang(lang)}"


def ocr() -> str:
    """Read the text in the image: ``ocr``."""
    return "ocr"


def answer(question: str, lang: str = "en") -> str:
    """Visual question answering: ``answer {lang} {question}``."""
    return _finish(f"answer {_lang(lang)} {_clean(question, 'question')}")


def question(answer_text: str, lang: str = "en") -> str:
    """Question generation: ``question {lang} {answer}``."""
    return _finish(f"question {_lang(lang)} {_clean(answer_text, 'answer')}")


def split_objects(objects: str | Iterable[str]) -> list[str]:
    """Normalise ``"cat ; dog"`` or ``["cat", "dog"]`` into validated, de-duplicated names."""
    if isinstance(objects, str):  # "cat ; dog ;" -> empty pieces from stray separators are skipped
        items = [piece for piece in objects.split(";") if piece.strip()]
    else:
        items = list(objects)
    names: list[str] = []
    for item in items:
        name = _clean(item, "object name")
        if name not in names:
            names.append(name)
    if not names:
        raise PromptError("at least one object name is required")
    if len(names) > MAX_OBJECTS:
        raise PromptError(f"{len(names)} object names given; the limit is {MAX_OBJECTS}")
    return names


def detect(objects: str | Sequence[str]) -> str:
    """Detection: ``detect a ; b``."""
    return _finish("detect " + " ; ".join(split_objects(objects)))


def segment(objects: str | Sequence[str]) -> str:
    """Referring segmentation: ``segment a ; b``."""
    return _finish("segment " + " ; ".join(split_objects(objects)))
