"""The demo model's card (``README.md`` beside its weights), written from its ``report.json``.

A model folder that ships (``models/demo``) says what it is like any model a user downloads: how it was
made (the command, the steps, the machine), and what it scores on data it never saw. Every figure comes
from the report of the run that produced the weights.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any


def _flags(recipe: dict[str, Any]) -> str:
    """The ``python -m finetune demo`` flags that differ from the defaults (none for the shipped recipe)."""
    from finetune.config import to_json
    from finetune.demo import DemoConfig

    default = to_json(DemoConfig())
    changed = []
    for name, value in recipe.items():
        if name in ("out", "report", "work", "force") or value == default[name]:
            continue
        option = name.replace("_", "-")
        if isinstance(value, bool):
            changed.append(f"--{option}" if value else f"--no-{option}")
            continue
        values = value if isinstance(value, list) else [value]  # a tuple flag is repeated
        changed += [f"--{option} {v}" for v in values]
    return " ".join(changed)


def _scores_row(name: str, step: int, seconds: float, heldout: dict[str, Any]) -> str:
    det, vqa = heldout["detection"], heldout["vqa"]
    per_class = " / ".join(f"{ap:.3f}" for ap in det["ap_50"].values())
    cells = [name, f"{step:,}", f"{seconds / 60:.1f}", f"**{det['map_50']:.3f}**", f"{det['map']:.3f}", per_class]
    return "| " + " | ".join([*cells, f"{vqa['accuracy']:.3f}"]) + " |"


def card_text(report: dict[str, Any], date: str) -> str:
    """The card's markdown."""
    recipe, training, final = report["recipe"], report["training"], report["heldout"]
    classes = " / ".join(final["detection"]["ap_50"])
    flags = _flags(recipe)
    command = f"python -m finetune demo{' ' + flags if flags else ''}"
    rows = [_scores_row("final", training["steps"], training["seconds"], final)]
    rows += [_scores_row("snapshot", p["step"], p["seconds"], p["heldout"]) for p in report["curve"][:-1]]
    by_type = final["vqa"].get("by_type", {})
    prior = report["baselines"]["majority_answer"].get("by_type", {})
    vqa_rows = [f"| {kind} | {score:.3f} | {prior.get(kind, float('nan')):.3f} |" for kind, score in by_type.items()]
    stages = "\n".join(
        f"| {i} | {s['name']} | {s['steps']:,} | {s['lr']:g} | {s['decay_steps']:,} |"
        for i, s in enumerate(report["stages"], 1)
    )
    load = training["load_average_before"][0], training["load_average_after"][0]
    return f"""# PaliGemma demo model (tiny shape, synthetic shapes)

A tiny PaliGemma ({report["model_shape"]["image_size"]} px) trained from random weights on synthetic
images of circles, squares and triangles, to detect them (`detect circle ; square ; triangle`) and answer
questions about them (`answer en how many shapes are there?`). It is what `make serve` serves when
`PALIGEMMA_MODEL` is unset. It knows nothing of real photographs.

Made by `{command}` on {date} ({training["device"]}, {training["threads"]} threads,
{training["cpu_count"]} cores, torch {training.get("torch", "?")}): {training["steps"]:,} steps of batch
{recipe["batch_size"]} in {training["seconds"] / 60:.1f} min (load average {load[0]:.1f} before,
{load[1]:.1f} after). Every stage stops after its steps, never on time, so the same command gives the same
weights on a busy machine.

| stage | examples | steps | lr | decay steps |
|---|---|---|---|---|
{stages}

Held-out: {final["detection"]["images"]} images (seed {recipe["heldout_seed"]}), never trained on; minutes
are the wall time of that run up to that step.

| model | steps | minutes | mAP@0.5 | mAP@[.5:.95] | AP@0.5 {classes} | VQA |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Baselines: the mean training box per class present, mAP@0.5
{report["baselines"]["mean_box"]["map_50"]:.4f}; the most common training answer to the same question,
VQA {report["baselines"]["majority_answer"]["accuracy"]:.3f}.

| question type | VQA accuracy | most-common-answer baseline |
|---|---|---|
{chr(10).join(vqa_rows)}

Every number here is in `report.json` beside this file.
"""


def write_card(out: Path, report: dict[str, Any]) -> Path:
    """Write ``out/README.md`` from ``report``; returns its path."""
    path = out / "README.md"
    path.write_text(card_text(report, datetime.date.today().isoformat()))
    return path
