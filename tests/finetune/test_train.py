"""A real 3-step LoRA run on the tiny checkpoint: the loss goes down and the run's files are all there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor

from finetune.config import TrainConfig
from finetune.data.collate import ExampleDataset, PaliGemmaCollator
from finetune.data.examples import detection_examples
from finetune.data.loaders import load_coco
from finetune.training.model import LANGUAGE_MODEL_PATTERN
from finetune.training.train import train


def _loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        return float(model.eval()(**batch).loss)


def test_three_lora_steps_lower_the_loss(tiny_checkpoint: Path, shapes: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    data = load_coco(shapes / "annotations.json")
    data.images = data.images[:4]
    (tmp_path / "train.json").write_text(json.dumps(_coco_subset(shapes, 4)))
    cfg = TrainConfig(
        base=str(tiny_checkpoint), out=str(tmp_path / "run"), method="lora", coco=(str(tmp_path / "train.json"),),
        coco_images=str(shapes), absent_per_image=0, batch_size=4, max_steps=3, lr=2e-2, logging_steps=1,
        threads=2, seed=0,
    )  # fmt: skip
    adapter = train(cfg)

    processor = PaliGemmaProcessor.from_pretrained(tiny_checkpoint)
    examples = ExampleDataset(detection_examples(data, absent_per_image=0, seed=0))
    batch = PaliGemmaCollator(processor)([examples[i] for i in range(len(examples))])
    base = PaliGemmaForConditionalGeneration.from_pretrained(tiny_checkpoint)
    before = _loss(base, batch)
    after = _loss(PeftModel.from_pretrained(base, str(adapter)), batch)
    assert after < before - 0.05, (before, after)

    run = tmp_path / "run"
    assert {"train_config.json", "learning_curve.json", "train_result.json", "adapter"} <= {
        p.name for p in run.iterdir()
    }
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_checkpoint.resolve())
    assert adapter_config["target_modules"] == LANGUAGE_MODEL_PATTERN.format("|".join(cfg.lora_targets))
    assert json.loads((adapter / "train_config.json").read_text())["method"] == "lora"
    assert [p["step"] for p in json.loads((run / "learning_curve.json").read_text())] == [1, 2, 3]
    assert (adapter / "tokenizer.json").is_file()  # the processor travels with the adapter
    assert json.loads((run / "train_result.json").read_text())["steps"] == 3


def _coco_subset(root: Path, n: int) -> dict[str, object]:
    raw = json.loads((root / "annotations.json").read_text())
    keep = {im["id"] for im in raw["images"][:n]}
    return {
        **raw,
        "images": [im for im in raw["images"] if im["id"] in keep],
        "annotations": [a for a in raw["annotations"] if a["image_id"] in keep],
    }


def test_lora_targets_only_the_language_model(tiny_checkpoint: Path, shapes: Path, tmp_path: Path) -> None:
    from finetune.training.model import load_model

    cfg = TrainConfig(base=str(tiny_checkpoint), out=str(tmp_path), vqa=(str(shapes / "vqa.jsonl"),))
    model, _ = load_model(cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("language_model" in n and "lora_" in n for n in trainable)
    assert any("gate_proj" in n for n in trainable) and any("o_proj" in n for n in trainable)


def test_full_method_freezes_what_it_is_told(tiny_checkpoint: Path, shapes: Path, tmp_path: Path) -> None:
    from finetune.training.model import load_model

    cfg = TrainConfig(
        base=str(tiny_checkpoint), out=str(tmp_path), vqa=(str(shapes / "vqa.jsonl"),), method="full",
        freeze_vision=True, freeze_projector=False,
    )  # fmt: skip
    model, _ = load_model(cfg)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    assert not any(v for n, v in grads.items() if "vision_tower" in n)
    assert all(v for n, v in grads.items() if "multi_modal_projector" in n or "language_model" in n)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_qlora_without_a_gpu_says_so(tiny_checkpoint: Path, shapes: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(base=str(tiny_checkpoint), out=str(tmp_path), vqa=(str(shapes / "vqa.jsonl"),), method="qlora")
    with pytest.raises(RuntimeError, match="--method qlora needs a CUDA GPU"):
        train(cfg)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"base": ""}, "--base is required"),
        ({"vqa": ()}, "no training data: give --coco, --segment-coco, --jsonl or --vqa"),
        ({"method": "prefix"}, "--method must be lora, qlora or full"),
        ({"batch_size": 0}, "--batch-size must be >= 1"),
        ({"max_minutes": 0.0}, "--max-minutes must be positive"),
        ({"synonyms": ("sq",)}, "--synonyms entries look like RAW=CANONICAL"),
        ({"loc_stride": 0}, "--loc-stride must be between 1 and 64"),
        ({"decay_steps": 5, "max_steps": 4}, "--decay-steps must be >= 0 and fit in --max-steps"),
        ({"decay_steps": 2, "max_steps": 4, "scheduler": "cosine"}, "--decay-steps sets the schedule itself"),
        ({"snapshot_steps": (0,)}, "--snapshot-steps must be >= 1"),
    ],
)
def test_config_errors_name_the_flag(overrides: dict[str, object], message: str) -> None:
    values: dict[str, object] = {"base": "b", "out": "o", "vqa": ("v.jsonl",), **overrides}
    with pytest.raises(ValueError, match=message):
        TrainConfig(**values)  # type: ignore[arg-type]


def test_decay_steps_bring_the_rate_down_linearly_over_the_last_steps(
    tiny_checkpoint: Path, shapes: Path, tmp_path: Path
) -> None:
    cfg = TrainConfig(
        base=str(tiny_checkpoint), out=str(tmp_path / "run"), method="full", vqa=(str(shapes / "vqa.jsonl"),),
        batch_size=2, max_steps=8, warmup_steps=2, decay_steps=4, lr=1e-3, logging_steps=1, threads=2, seed=0,
    )  # fmt: skip
    train(cfg)
    rates = [p["learning_rate"] for p in json.loads((tmp_path / "run" / "learning_curve.json").read_text())]
    # The rate each step used: warm-up from 0 (steps 1-2), stable (3-4), linear decay (5-8) that would
    # reach 0 at step 9: the last step trains at a quarter of the peak.
    assert rates == pytest.approx([0.0, 5e-4, 1e-3, 1e-3, 1e-3, 7.5e-4, 5e-4, 2.5e-4])


def test_max_minutes_is_a_safety_stop_that_still_saves(
    tiny_checkpoint: Path, shapes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = TrainConfig(
        base=str(tiny_checkpoint), out=str(tmp_path / "run"), method="full", vqa=(str(shapes / "vqa.jsonl"),),
        batch_size=2, max_steps=1_000_000, max_minutes=0.02, lr=1e-3, logging_steps=1, threads=2, seed=0,
    )  # fmt: skip
    model = train(cfg)
    result = json.loads((tmp_path / "run" / "train_result.json").read_text())
    assert 1 <= result["steps"] < 1_000_000 and result["seconds"] >= 1.2  # stopped by the clock, not the steps
    assert (model / "model.safetensors").is_file()
    bar = capsys.readouterr().err
    assert "100/100 %" in bar and f"step {result['steps']}" in bar  # the bar counts the minutes, not 1,000,000 steps
