"""The committed demo model scores what its card says: what ``make serve`` serves is what was measured.

``models/demo/report.json`` holds the held-out figures of the run that produced the weights (also in its
``README.md`` card and the project README). Here the same held-out set is generated again from its seed and
scored through the same transformers engine; the figures must match up to float noise (another CPU may
round a few logits differently, which can move a box by a bin or flip a close answer).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from finetune.data.loaders import load_coco, load_vqa
from finetune.data.synth import generate
from finetune.recipes.demo import score_heldout
from finetune.recipes.demo_config import DemoConfig

pytestmark = pytest.mark.slow


def test_the_shipped_model_scores_its_card(demo_checkpoint: Path, tmp_path: Path) -> None:
    report = json.loads((demo_checkpoint / "report.json").read_text())
    recipe = report["recipe"]
    assert recipe["heldout_seed"] == DemoConfig().heldout_seed
    held = generate(
        tmp_path / "heldout", recipe["heldout_images"], seed=recipe["heldout_seed"],
        questions_per_image=recipe["questions_per_image"],
    )  # fmt: skip
    scores = asyncio.run(
        score_heldout(demo_checkpoint, load_coco(held / "annotations.json"), load_vqa(held / "vqa.jsonl"), None, 0)
    )

    claimed = report["heldout"]
    assert scores["detection"]["images"] == claimed["detection"]["images"]
    for key in ("map_50", "map"):
        assert scores["detection"][key] == pytest.approx(claimed["detection"][key], abs=0.02), key
    assert scores["vqa"]["accuracy"] == pytest.approx(claimed["vqa"]["accuracy"], abs=0.02)
    card = (demo_checkpoint / "README.md").read_text()
    assert f"**{claimed['detection']['map_50']:.3f}**" in card  # the card shows the report's figure
