"""Evaluation through the Engine protocol: report, predictions and pictures; label handling; a real engine."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from PIL import Image
from transformers import PaliGemmaProcessor

from finetune.data.loaders import load_coco, load_vqa
from finetune.data.records import Box, DetectionSet
from finetune.evaluation.evaluate import evaluate, open_engine
from finetune.evaluation.pictures import comparison_picture
from paligemma.tokens import encode_box
from service.engines.protocol import GenerationRequest
from tests.finetune.conftest import FakeEngine


def _oracle(data: DetectionSet, vqa_answers: dict[str, str]) -> object:
    """Replies with the ground truth of the image it is shown (matched by pixels)."""
    by_pixels = {Image.open(im.path).convert("RGB").tobytes(): im for im in data.images}

    def reply(request: GenerationRequest) -> str:
        if request.prefix.startswith("answer en "):
            return vqa_answers[request.prefix.removeprefix("answer en ")]
        image = by_pixels[request.image.tobytes()]
        asked = request.prefix.removeprefix("detect ").split(" ; ")
        objects = [o for o in image.objects if o.label in asked]
        return " ; ".join(f"{encode_box(*o.box, image.width, image.height)} {o.label}" for o in objects)

    return reply


def test_oracle_engine_scores_perfectly_and_writes_report(tiny_checkpoint: Path, shapes: Path, tmp_path: Path) -> None:
    data = load_coco(shapes / "annotations.json")
    vqa = load_vqa(shapes / "vqa.jsonl")
    answers = {}
    for r in vqa:
        answers.setdefault(r.question, r.answers[0])
    vqa = [r for r in vqa if answers[r.question] == r.answers[0]]  # one answer per question text
    tokenizer = PaliGemmaProcessor.from_pretrained(tiny_checkpoint).tokenizer
    engine = FakeEngine(tokenizer, _oracle(data, answers))  # type: ignore[arg-type]
    report = asyncio.run(evaluate(engine, detection=data, vqa=vqa, out=tmp_path, pictures=3))
    assert report["detection"]["map_50"] == pytest.approx(1.0)
    assert report["detection"]["map"] > 0.9  # loc bins round boxes by under a pixel
    assert report["vqa"]["accuracy"] == 1.0
    assert len(engine.requests) == len(data.images) + len(vqa)  # one detect prompt per image: all classes
    assert engine.requests[0].prefix == "detect circle ; square ; triangle"
    assert json.loads((tmp_path / "report.json").read_text())["detection"]["images"] == len(data.images)
    predictions = json.loads((tmp_path / "predictions.json").read_text())
    assert len(predictions["vqa"]) == len(vqa) and len(predictions["detection"]) == len(data.images)
    pictures = sorted((tmp_path / "pictures").glob("*.png"))
    assert [p.name for p in pictures] == ["000.png", "001.png", "002.png"]
    assert Image.open(pictures[0]).width > 2 * 336  # ground truth and prediction panels, scaled up


def test_asked_classes_limit_ground_truth_and_map(tiny_checkpoint: Path, shapes: Path) -> None:
    data = load_coco(shapes / "annotations.json")
    tokenizer = PaliGemmaProcessor.from_pretrained(tiny_checkpoint).tokenizer
    engine = FakeEngine(tokenizer, _oracle(data, {}))  # type: ignore[arg-type]
    report = asyncio.run(evaluate(engine, detection=data, classes=["circle", "square"]))
    assert engine.requests[0].prefix == "detect circle ; square"
    assert report["detection"]["classes"] == ["circle", "square"]
    assert report["detection"]["ap_50"] == {"circle": pytest.approx(1.0), "square": pytest.approx(1.0)}
    assert report["detection"]["map_50"] == pytest.approx(1.0)  # the unasked triangle is not averaged in as 0
    with pytest.raises(ValueError, match="not in this dataset"):
        data.only(["diamond"])


def test_per_class_prompts_and_label_rules(tiny_checkpoint: Path, shapes: Path) -> None:
    data = load_coco(shapes / "annotations.json")
    data.images = data.images[:2]
    tokenizer = PaliGemmaProcessor.from_pretrained(tiny_checkpoint).tokenizer
    box = "<loc0100><loc0100><loc0500><loc0500>"
    replies = {"detect circle": f"{box}", "detect square": f"{box} triangle", "detect triangle": f"{box} triangle"}
    engine = FakeEngine(tokenizer, lambda r: replies[r.prefix])
    report = asyncio.run(evaluate(engine, detection=data, classes_per_prompt=1))
    assert len(engine.requests) == 2 * 3
    assert report["detection"]["detections"] == 2 * 2  # unlabeled -> circle; "triangle" when asked square: dropped


def test_comparison_picture_takes_more_columns() -> None:
    image = Image.new("RGB", (112, 112), (20, 20, 20))
    truth = [Box("circle", (10, 10, 50, 50))]
    one = comparison_picture(image, truth, [("finetuned", [Box("circle", (12, 10, 50, 52), 0.9)])])
    two = comparison_picture(image, truth, [("base", []), ("finetuned", [Box("circle", (12, 10, 50, 52), 0.9)])])
    assert two.width - one.width == 336 + 8 and two.height == one.height


def test_real_transformers_engine_on_a_handful_of_images(tiny_checkpoint: Path, shapes: Path, tmp_path: Path) -> None:
    data = load_coco(shapes / "annotations.json")
    data.images = data.images[:3]
    vqa = load_vqa(shapes / "vqa.jsonl")[:4]

    async def run() -> dict[str, object]:
        async with open_engine(tiny_checkpoint, "transformers", device="cpu", max_batch_size=8) as engine:
            return await evaluate(engine, detection=data, vqa=vqa, out=tmp_path, pictures=2, max_new_tokens=8)

    report = run_report = asyncio.run(run())
    assert report["engine"] == "transformers" and 0.0 <= run_report["detection"]["map"] <= 1.0  # type: ignore[index]
    assert (tmp_path / "report.json").is_file() and len(list((tmp_path / "pictures").glob("*.png"))) == 2
