"""One LoRA adapter, every way it can be served: held-out figures per form and token-for-token agreement.

The forms (:data:`FORMS`) run on the service's own engines (:func:`finetune.evaluation.evaluate.open_engine`), one
engine at a time, each answering the same ``detect`` prompts on the same images. Every answer's token ids
are kept, so besides AP@0.5 per class the report counts, for each served form, the answers equal to
the unmerged adapter's (the reference: what training produced) token for token.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from finetune.data.records import DetectionSet
from finetune.evaluation.evaluate import answers_to_boxes, detection_answers, open_engine
from finetune.evaluation.metrics import coco_map
from service.engines.protocol import Engine

FORMS = ("base", "adapter (transformers)", "merged (transformers)", "merged (vLLM)", "adapter per request (vLLM)")
REFERENCE = "adapter (transformers)"

Opener = Callable[[], contextlib.AbstractAsyncContextManager[Engine]]


def _openers(base: Path, adapter: Path, merged: Path, name: str) -> dict[str, tuple[Opener, str | None]]:
    """Each form's engine and the adapter name its requests select."""
    return {
        "base": (lambda: open_engine(base), None),
        "adapter (transformers)": (lambda: open_engine(adapter), None),
        "merged (transformers)": (lambda: open_engine(merged), None),
        "merged (vLLM)": (lambda: open_engine(merged, "vllm"), None),
        "adapter per request (vLLM)": (lambda: open_engine(base, "vllm", lora={name: str(adapter)}), name),
    }


async def served_forms(
    base: Path,
    adapter: Path,
    merged: Path,
    heldout: DetectionSet,
    prompts: dict[str, list[str]],
    name: str,
    forms: Sequence[str] = FORMS,
) -> dict[str, Any]:
    """``{form: {prompt key: {"map_50", "map", "ap_50", "same_as_adapter"}}}`` on ``heldout``, each prompt
    key's classes asked in one ``detect`` prompt per image (ground truth limited to them)."""
    openers = _openers(base, adapter, merged, name)
    scores: dict[str, dict[str, Any]] = {}
    texts: dict[tuple[str, str], list[tuple[int, ...]]] = {}
    for form in forms:
        opener, selected = openers[form]
        async with opener() as engine:
            scores[form] = {}
            for key, classes in prompts.items():
                data = heldout.only(classes)
                answers = await detection_answers(engine, data, classes, adapter=selected, concurrency=128)
                found = coco_map(data, answers_to_boxes(answers, data, engine.tokenizer()))
                scores[form][key] = {k: found[k] for k in ("map_50", "map", "ap_50")}
                texts[form, key] = [gen.token_ids for _, _, gen in answers]
    for form in forms:
        for key in prompts:
            if (REFERENCE, key) in texts and form != "base":
                same = sum(a == b for a, b in zip(texts[form, key], texts[REFERENCE, key], strict=True))
                scores[form][key]["same_as_adapter"] = same
    return {"images": len(heldout.images), "scores": scores}


def table_markdown(forms: dict[str, Any], prompts: dict[str, list[str]]) -> str:
    """The README's table: one row per form and prompt, AP@0.5 per class, mAP@0.5, answers equal to the
    adapter's."""
    classes = list(dict.fromkeys(c for group in prompts.values() for c in group))
    head = ["served as", "prompt", *classes, "mAP@0.5", "same text as adapter"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for form, by_prompt in forms["scores"].items():
        for key, asked in prompts.items():
            row = by_prompt[key]
            cells = [f"{row['ap_50'][c]:.3f}" if c in asked else "" for c in classes]
            same = row.get("same_as_adapter")
            agree = "" if same is None else f"{same}/{forms['images']}"
            lines.append(
                f"| {form} | {len(asked)} classes | " + " | ".join(cells) + f" | **{row['map_50']:.3f}** | {agree} |"
            )
    return "\n".join(lines) + "\n"


async def compare_pictures(
    base: Path, tuned: Path, heldout: DetectionSet, classes: list[str], out: Path, count: int
) -> list[str]:
    """``eval --compare``'s pictures and contact sheet: base left, ``tuned`` right; returns their paths."""
    from finetune.evaluation.compare import compare

    engines = {"base": open_engine(base), "finetuned": open_engine(tuned)}
    report = await compare(
        engines, detection=heldout.only(classes), out=out, pictures=count, sheet=min(count, 8), classes=classes
    )
    return [*report["pictures"], *report.get("contact_sheets", [])]
