"""The shipped LoRA adapter (``models/demo-diamond``, ``finetune.recipes.transfer``) and its recipe.

- Every served form (the merged checkpoint on both engines, the adapter selected per request on vLLM)
  answers the held-out ``detect`` prompts token for token as the unmerged adapter does, and scores what
  the adapter's card says.
- Merging the shipped adapter again is a no-op.
- The recipe runs end to end on the tiny checkpoint (a few steps) and, run again, does not retrain.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from finetune.config import MergeConfig
from finetune.data.loaders import load_coco
from finetune.data.records import DetectionSet
from finetune.data.synth import generate_cached
from finetune.evaluation.evaluate import open_engine
from finetune.evaluation.served import FORMS, served_forms
from finetune.recipes.transfer import OLD, TransferConfig, run_transfer, train_cached, train_config
from finetune.training.merge import merge
from paligemma.checkpoint import adapter_base

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
ADAPTER = Path(__file__).resolve().parents[2] / "models" / "demo-diamond"


@pytest.fixture(scope="module")
def card() -> dict[str, Any]:
    """The shipped adapter's report.json (its card's figures)."""
    if not (ADAPTER / "adapter_model.safetensors").is_file():
        pytest.fail(f"{ADAPTER} holds no adapter_model.safetensors: it is committed with the repository")
    return dict(json.loads((ADAPTER / "report.json").read_text()))


@pytest.fixture(scope="module")
def heldout(tmp_path_factory: pytest.TempPathFactory, card: dict[str, Any]) -> DetectionSet:
    """The card's held-out set, generated again from its seed."""
    recipe = card["recipe"]
    shapes = (*OLD, recipe["new_class"])
    folder = generate_cached(
        tmp_path_factory.mktemp("held") / "heldout", recipe["heldout_images"], recipe["heldout_seed"], shapes=shapes
    )
    return load_coco(folder / "annotations.json")


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return merge(MergeConfig(run=str(ADAPTER), out=str(tmp_path_factory.mktemp("merged") / "m"), dtype="float32"))


def test_the_shipped_adapter_finds_its_base_in_any_clone(demo_checkpoint: Path, card: dict[str, Any]) -> None:
    config = json.loads((ADAPTER / "adapter_config.json").read_text())
    assert not Path(config["base_model_name_or_path"]).is_absolute()
    assert adapter_base(ADAPTER) == str(demo_checkpoint.resolve())


def test_merging_the_shipped_adapter_again_does_nothing(merged: Path, caplog: pytest.LogCaptureFixture) -> None:
    before = (merged / "model.safetensors").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="finetune.training.merge"):
        merge(MergeConfig(run=str(ADAPTER), out=str(merged), dtype="float32"))
    assert "already holds this merge" in caplog.text
    assert (merged / "model.safetensors").stat().st_mtime_ns == before


def test_every_served_form_answers_as_the_adapter_and_scores_its_card(
    demo_checkpoint: Path, merged: Path, heldout: DetectionSet, card: dict[str, Any]
) -> None:
    prompts, name = card["heldout"]["prompts"], card["recipe"]["new_class"]
    forms = asyncio.run(served_forms(demo_checkpoint, ADAPTER, merged, heldout, prompts, name))
    images = len(heldout.images)
    for form in FORMS[2:]:
        for key in prompts:
            assert forms["scores"][form][key]["same_as_adapter"] == images, (form, key)
    claimed = card["forms"]["scores"]
    for form in FORMS:
        for key in prompts:
            assert forms["scores"][form][key]["map_50"] == pytest.approx(claimed[form][key]["map_50"], abs=0.02)
    # the adapter taught something: the base finds no diamond, the adapter does
    assert forms["scores"]["base"]["new"]["ap_50"][name] < 0.05
    assert forms["scores"]["adapter (transformers)"]["new"]["ap_50"][name] > 0.3


def test_the_recipe_runs_end_to_end_and_is_cached(
    tiny_checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = TransferConfig(
        base=str(tiny_checkpoint),
        adapter=str(tmp_path / "adapter"),
        out=str(tmp_path / "out"),
        work=str(tmp_path / "work"),
        new_images=8,
        old_images=8,
        heldout_images=3,
        steps=3,
        decay_steps=1,
        warmup_steps=0,
        batch_size=4,
        threads=1,
        pictures=2,
    )
    report = run_transfer(cfg)
    assert report["train"]["steps"] == 3
    assert set(report["forms"]["scores"]) == set(FORMS)
    assert report["forms"]["scores"]["merged (vLLM)"]["old"]["same_as_adapter"] <= 3
    assert adapter_base(cfg.adapter) == str(tiny_checkpoint.resolve())
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "| adapter per request (vLLM) | 4 classes |" in card
    assert (tmp_path / "out" / "compare" / "contact_sheet.png").is_file()
    assert len(list((tmp_path / "out" / "compare" / "pictures").glob("*.png"))) == 2
    trained = (tmp_path / "work" / "run" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    new, old = Path(cfg.work) / "new", Path(cfg.work) / "old"
    with caplog.at_level(logging.INFO, logger="finetune.recipes.transfer"):
        assert train_cached(train_config(cfg, new, old), force=False)["steps"] == 3
    assert "not training again" in caplog.text
    assert (tmp_path / "work" / "run" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == trained


def test_vllm_told_to_serve_an_adapter_as_the_model_says_how(card: dict[str, Any]) -> None:
    async def start() -> None:
        async with open_engine(ADAPTER, "vllm"):
            pass

    with pytest.raises(ValueError, match="--lora NAME=") as error:
        asyncio.run(start())
    assert str(Path(adapter_base(ADAPTER) or "")) in str(error.value)
