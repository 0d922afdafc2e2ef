"""Loaders on small fixture files with malformed records, and how detection records become prompts."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.data.examples import detection_examples, detection_target, vqa_examples
from finetune.data.loaders import load_coco, load_jsonl, load_vqa
from finetune.data.records import Box, DataError, DetectionImage, DetectionSet
from paligemma import parse_detections

FIXTURES = Path(__file__).parent / "fixtures"


def test_coco_loader_reports_every_bad_record_with_its_place() -> None:
    data = load_coco(FIXTURES / "coco.json", synonyms={"Square": "square"})
    assert data.classes == ["square", "circle"]  # lower-cased, synonyms applied, the empty name rejected
    assert [im.image_id for im in data.images] == [1, 2]
    first, second = data.images
    assert [(o.label, o.box) for o in first.objects] == [("square", (5, 5, 15, 15)), ("circle", (20, 10, 28, 18))]
    assert [(o.label, o.box) for o in second.objects] == [("square", (5, 5, 15, 15))]
    reasons = {issue.where: issue.reason for issue in data.issues}
    assert all(issue.file.endswith("coco.json") for issue in data.issues)
    assert "empty label" in reasons["categories[2] (id 3)"]
    assert "missing image" in reasons["images[2] (id 3)"]
    assert "outside" in reasons["annotations[2] (id 12)"]
    assert "empty label" in reasons["annotations[3] (id 13)"]
    assert "unknown image_id" in reasons["annotations[6] (id 16)"]
    assert len(data.issues) == 5  # annotation 15 belongs to the already-reported missing image


def test_coco_loader_fails_fast_when_asked() -> None:
    with pytest.raises(DataError, match=r"coco\.json:categories\[2\] \(id 3\): empty label"):
        load_coco(FIXTURES / "coco.json", on_error="fail")


def test_jsonl_loader_names_file_and_line() -> None:
    examples = load_jsonl(FIXTURES / "bigvision.jsonl")
    assert [(e.image.name, e.prefix, e.suffix) for e in examples] == [
        ("a.png", "caption en", "a red square"),
        ("b.png", "detect square", ""),  # an empty target is allowed
    ]
    with pytest.raises(DataError, match=r"bigvision\.jsonl:line 2: invalid JSON"):
        load_jsonl(FIXTURES / "bigvision.jsonl", on_error="fail")


def test_jsonl_loader_logs_skipped_records(caplog: pytest.LogCaptureFixture) -> None:
    load_jsonl(FIXTURES / "bigvision.jsonl")
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "bigvision.jsonl:line 2: invalid JSON" in messages
    assert "bigvision.jsonl:line 3: missing image 'images/nope.png'" in messages
    assert "bigvision.jsonl:line 4: empty or missing prefix" in messages


def test_vqa_loader_single_and_multiple_answers() -> None:
    records = load_vqa(FIXTURES / "vqa.jsonl")
    assert [(r.question, r.answers, r.kind) for r in records] == [
        ("what color is the square?", ("red",), "color"),
        ("what color is the square?", ("blue", "blue", "dark blue", "blue"), ""),
    ]
    assert [e.suffix for e in vqa_examples(records)] == ["red", "blue"]  # majority answer
    assert vqa_examples(records)[0].prefix == "answer en what color is the square?"
    with pytest.raises(DataError, match=r"vqa\.jsonl:line 3: no answer"):
        load_vqa(FIXTURES / "vqa.jsonl", on_error="fail")


def _image() -> DetectionImage:
    objects = [
        Box("circle", (60.0, 10.0, 90.0, 40.0)),
        Box("square", (10.0, 50.0, 30.0, 70.0)),
        Box("circle", (10.0, 10.0, 30.0, 30.0)),
    ]
    return DetectionImage(0, Path("x.png"), 100, 100, objects)


def test_targets_are_paligemma_format_in_reading_order() -> None:
    image = _image()
    target = detection_target(image, ["circle"])
    assert target == "<loc0102><loc0102><loc0307><loc0307> circle ; <loc0102><loc0614><loc0409><loc0921> circle"
    parsed = parse_detections(target, 100, 100)
    assert [d.label for d in parsed] == ["circle", "circle"]
    assert parsed[0].box == pytest.approx((10, 10, 30, 30), abs=0.1)
    assert detection_target(image, ["triangle"]) == ""  # absent: the suffix is just <eos>
    coarse = detection_target(image, ["square"], loc_stride=16)
    assert coarse == "<loc0512><loc0096><loc0720><loc0304> square"  # multiples of 16


def test_prompts_list_present_and_sampled_absent_classes() -> None:
    data = DetectionSet([_image()], ["circle", "square", "triangle", "star"])
    (multi,) = detection_examples(data, absent_per_image=1, seed=0)
    asked = multi.prefix.removeprefix("detect ").split(" ; ")
    assert {"circle", "square"} <= set(asked) and len(asked) == 3
    assert multi.suffix.count(";") == 2 and "triangle" not in multi.suffix and "star" not in multi.suffix
    per_class = detection_examples(data, absent_per_image=2, seed=0, prompt_style="per_class")
    assert [e.prefix for e in per_class][:2] == ["detect circle", "detect square"]
    assert [e.suffix for e in per_class][2:] == ["", ""]
    assert detection_examples(data, seed=3) == detection_examples(data, seed=3)  # deterministic per seed
