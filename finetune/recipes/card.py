"""The demo model's and the LoRA adapter's cards (``README.md`` beside the weights), written from their reports.

A model folder that ships (``models/demo``) says what it is like any model a user downloads: how it was
made (the command, the steps, the machine), and what it scores on data it never saw. Every figure comes
from the report of the run that produced the weights. The cards take plain data (the report, and the recipe
command's defaults, to show only the flags that differ), so this module imports no recipe.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any


def _flags(recipe: dict[str, Any], default: dict[str, Any]) -> str:
    """The recipe's flags that differ from ``default``, the recipe command's defaults (none for a shipped
    recipe)."""
    changed = []
    for name, value in recipe.items():
        if name in ("out", "report", "work", "adapter", "force") or value == default[name]:
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


def card_text(report: dict[str, Any], date: str, defaults: dict[str, Any]) -> str:
    """The card's markdown."""
    recipe, training, final = report["recipe"], report["training"], report["heldout"]
    classes = " / ".join(final["detection"]["ap_50"])
    flags = _flags(recipe, defaults)
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


def write_card(out: Path, report: dict[str, Any], defaults: dict[str, Any]) -> Path:
    """Write ``out/README.md`` from ``report``; returns its path."""
    path = out / "README.md"
    path.write_text(card_text(report, datetime.date.today().isoformat(), defaults))
    return path


def adapter_card_text(report: dict[str, Any], date: str, defaults: dict[str, Any]) -> str:
    """The LoRA adapter's card (``finetune.recipes.transfer``): what it teaches, how it was made, the table."""
    from finetune.evaluation.served import table_markdown

    recipe, run = report["recipe"], report["train"]
    new, prompts = recipe["new_class"], report["heldout"]["prompts"]
    flags = _flags(recipe, defaults)
    scores = report["forms"]["scores"]
    kept = ", ".join(
        f"{c} {scores['adapter (transformers)']['old']['ap_50'][c] - scores['base']['old']['ap_50'][c]:+.3f}"
        for c in prompts["old"]
    )
    return f"""# LoRA adapter: the demo model learns `{new}`

A LoRA adapter (rank {run["lora_r"]}, alpha {run["lora_alpha"]}, language model only: {", ".join(run["lora_targets"])})
for the demo model (`{recipe["base"]}`, recorded relative to this folder in `adapter_config.json`). It
teaches it a fourth shape: `detect {" ; ".join(prompts["new"])}`; the old prompt
`detect {" ; ".join(prompts["old"])}` is trained on too, so it is not forgotten (what it still loses is
below).

Made by `python -m finetune lora-demo{" " + flags if flags else ""}` (`make demo-lora`) on {date}
({run["threads"]} threads, {run["cpu_count"]} cores): {run["steps"]:,} steps of batch {run["batch_size"]}
in {run["seconds"] / 60:.1f} min,
learning rate {run["lr"]:g} (warm-up {run["warmup_steps"]}, linear decay over the last {run["decay_steps"]:,}),
on {recipe["new_images"]:,} synthetic images holding all four shapes (asked all four) and
{recipe["old_images"]:,} holding only the old three (asked those three). Bounded by steps, never by time.

Held-out: {report["heldout"]["images"]} images with all four shapes (seed {recipe["heldout_seed"]}), never trained
on; AP@0.5 per class, ground truth limited to the classes asked; "same text" counts the `detect` answers
equal token for token to the unmerged adapter's on the transformers engine.

{table_markdown(report["forms"], prompts)}
On the old prompt, AP@0.5 against the base: {kept}.

Serve it per request on vLLM: `python -m service --engine vllm --model models/demo --lora {new}=models/demo-{new}`
and send `adapter={new}`. Every number here is in `report.json` beside this file.
"""


def write_adapter_card(adapter: Path, report: dict[str, Any], defaults: dict[str, Any]) -> Path:
    """Write ``adapter/README.md`` from ``report``; returns its path."""
    path = adapter / "README.md"
    path.write_text(adapter_card_text(report, datetime.date.today().isoformat(), defaults))
    return path
