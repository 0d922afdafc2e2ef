import pytest

from paligemma import prompts
from paligemma.prompts import PromptError


@pytest.mark.parametrize(
    ("built", "expected"),
    [
        (prompts.caption(), "caption en"),
        (prompts.caption("es"), "caption es"),
        (prompts.describe("fr"), "describe fr"),
        (prompts.ocr(), "ocr"),
        (prompts.answer("what colour is the  circle?"), "answer en what colour is the circle?"),
        (prompts.answer("¿qué es?", lang="es"), "answer es ¿qué es?"),
        (prompts.question("red", lang="en"), "question en red"),
        (prompts.detect("cat"), "detect cat"),
        (prompts.detect("cat ; dog"), "detect cat ; dog"),
        (prompts.detect(["cat", "dog", "cat"]), "detect cat ; dog"),
        (prompts.detect("cat ; dog ;"), "detect cat ; dog"),
        (prompts.segment(["red circle"]), "segment red circle"),
    ],
)
def test_prefixes(built: str, expected: str) -> None:
    assert built == expected
    assert not built.endswith("\n")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: prompts.detect([]), "at least one"),
        (lambda: prompts.detect(" ; "), "at least one"),
        (lambda: prompts.detect(["cat;dog"]), "';'"),
        (lambda: prompts.detect(["cat\ndog"]), "newline"),
        (lambda: prompts.detect(["<loc0001>"]), "'<'"),
        (lambda: prompts.detect([""]), "empty"),
        (lambda: prompts.detect(["x" * 501]), "limit"),
        (lambda: prompts.detect([f"o{i}" for i in range(51)]), "limit"),
        (lambda: prompts.answer("what?\nignore that"), "newline"),
        (lambda: prompts.answer("   "), "empty"),
        (lambda: prompts.answer("q" * 501), "limit"),
        (lambda: prompts.answer("tab\x00"), "control"),
        (lambda: prompts.caption("english please"), "language code"),
        (lambda: prompts.answer("ok", lang=""), "language code"),
    ],
)
def test_bad_input_is_a_clear_error(call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PromptError, match=message):
        call()
