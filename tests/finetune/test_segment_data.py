"""COCO masks (polygons, uncompressed and compressed RLE) -> ``segment`` targets, on small files written here."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from finetune.__main__ import main
from finetune.config import TrainConfig
from finetune.data.examples import detection_target
from finetune.data.records import DataError
from finetune.data.segments import (
    Segment,
    SegmentCodes,
    decode_mask,
    load_coco_segments,
    segment_examples,
    segment_target,
)
from finetune.training.train import build_examples
from paligemma.mask_encoder import MaskEncoder, crop_resize
from paligemma.parsing import parse_detections
from paligemma.segmentation import write_random_weights

W, H = 64, 48
SQUARE = [[8.0, 6.0, 30.0, 6.0, 30.0, 26.0, 8.0, 26.0]]  # x, y pairs: a 22x20 square near the top left
TRIANGLE = [[36.0, 44.0, 60.0, 44.0, 48.0, 28.0]]  # lower right


def polygon_mask(polygons: list[list[float]]) -> np.ndarray:
    return np.asarray(mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, H, W))))


def uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's iscrowd-style RLE: run lengths over the column-major pixels, starting with a run of zeros."""
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    return {"size": [H, W], "counts": ([0] if flat[0] else []) + runs}


def compressed_rle(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}  # as it is stored in JSON


def bbox_of(polygons: list[list[float]]) -> list[float]:
    xs, ys = polygons[0][0::2], polygons[0][1::2]
    return [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]


def write_coco(root: Path, annotations: list[dict[str, Any]], images: int = 3) -> Path:
    for i in range(1, images + 1):
        Image.new("RGB", (W, H), (40 * i, 90, 160)).save(root / f"{i}.png")
    coco = {
        "images": [{"id": i, "file_name": f"{i}.png", "width": W, "height": H} for i in range(1, images + 1)],
        "categories": [{"id": 1, "name": "Square"}, {"id": 2, "name": "triangle"}, {"id": 3, "name": "disk"}],
        "annotations": [{"id": 100 + n, "iscrowd": 0, **ann} for n, ann in enumerate(annotations)],
    }
    path = root / "instances.json"
    path.write_text(json.dumps(coco))
    return path


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> MaskEncoder:
    return MaskEncoder.from_npz(write_random_weights(tmp_path_factory.mktemp("vae") / "vae.npz", seed=3, encoder=True))


@pytest.fixture()
def three_formats(tmp_path: Path) -> Path:
    """The same square as a polygon (image 1), uncompressed RLE (image 2) and compressed RLE (image 3); image 1
    also has a triangle below it and a crowd region, which is skipped."""
    square, box = polygon_mask(SQUARE), bbox_of(SQUARE)
    crowd = uncompressed_rle(np.ones((H, W), np.uint8))
    return write_coco(
        tmp_path,
        [
            {"image_id": 1, "category_id": 2, "bbox": bbox_of(TRIANGLE), "segmentation": TRIANGLE},
            {"image_id": 1, "category_id": 1, "bbox": box, "segmentation": SQUARE},
            {"image_id": 2, "category_id": 1, "bbox": box, "segmentation": uncompressed_rle(square)},
            {"image_id": 3, "category_id": 1, "bbox": box, "segmentation": compressed_rle(square)},
            {"image_id": 1, "category_id": 3, "bbox": [0, 0, W, H], "iscrowd": 1, "segmentation": crowd},
        ],
    )


def test_polygon_and_both_rle_forms_give_the_same_seg_tokens(three_formats: Path, encoder: MaskEncoder) -> None:
    data = load_coco_segments(three_formats)
    assert data.issues == []
    assert data.classes == ["square", "triangle", "disk"]
    assert [[o.label for o in im.objects] for im in data.images] == [["triangle", "square"], ["square"], ["square"]]
    assert all(isinstance(o, Segment) for im in data.images for o in im.objects)
    masks = [decode_mask(im.objects[-1].segmentation, W, H) for im in data.images]  # type: ignore[attr-defined]
    assert all(np.array_equal(m, polygon_mask(SQUARE)) for m in masks)
    targets = [segment_target(im, ["square"], encoder) for im in data.images]
    assert targets[0] == targets[1] == targets[2]
    expected = encoder.encode_mask(polygon_mask(SQUARE), data.images[0].objects[1].box)  # the one-mask path
    assert targets[0] == detection_target(data.images[0], ["square"]).removesuffix(" square") + expected + " square"


def test_several_objects_are_joined_in_reading_order_and_parse_back(three_formats: Path, encoder: MaskEncoder) -> None:
    image = load_coco_segments(three_formats).images[0]
    target = segment_target(image, ["triangle", "square"], encoder)
    one = r"(?:<loc\d{4}>){4}(?:<seg\d{3}>){16}"
    assert re.fullmatch(rf"{one} square ; {one} triangle", target), target  # the square is higher up
    parsed = parse_detections(target, W, H)
    assert [d.label for d in parsed] == ["square", "triangle"]
    for det, (x, y, w, h) in zip(parsed, [bbox_of(SQUARE), bbox_of(TRIANGLE)], strict=True):
        assert det.box == pytest.approx((x, y, x + w, y + h), abs=0.5 * W / 1023)
        assert det.seg_tokens is not None and len(det.seg_tokens) == 16
    square = next(o for o in image.objects if o.label == "square")
    assert parsed[0].seg_tokens == tuple(encoder.encode(crop_resize(polygon_mask(SQUARE), square.box)[None])[0])
    assert segment_target(image, ["disk"], encoder) == ""  # the crowd region is not an object


def test_examples_use_segment_prompts_and_batched_codes(three_formats: Path, encoder: MaskEncoder) -> None:
    data = load_coco_segments(three_formats)
    codes = SegmentCodes(encoder, batch_size=2)
    examples = segment_examples(data, codes, absent_per_image=1, prompt_style="per_class")
    first = [e for e in examples if e.image == data.images[0].path]
    assert [e.prefix for e in first] == ["segment triangle", "segment square", "segment disk"]
    assert first[2].suffix == ""  # absent class: the model learns to answer nothing
    assert first[1].suffix == segment_target(data.images[0], ["square"], encoder)
    multi = segment_examples(data, encoder, absent_per_image=0, prompt_style="multi")
    assert {e.prefix for e in multi if e.image == data.images[0].path} <= {
        "segment triangle ; square",
        "segment square ; triangle",
    }
    assert segment_target(data.images[0], ["square"], codes, loc_stride=16).startswith("<loc0128><loc0128>")


SQUARE_MASK = polygon_mask(SQUARE)
BAD = [
    ({"segmentation": []}, "empty segmentation"),
    ({"segmentation": [[8.0, 6.0, 30.0, 6.0]]}, "at least 3"),
    ({"segmentation": {"size": [H + 1, W], "counts": compressed_rle(SQUARE_MASK)["counts"]}}, "RLE size"),
    ({"segmentation": {"size": [H, W], "counts": [W * H - 5, 3]}}, "summing to"),
    ({"segmentation": {"size": [H, W], "counts": [W * H]}}, "zero area"),
    ({"segmentation": [[40.0, 30.0, 50.0, 30.0, 60.0, 30.0]]}, "zero area"),  # three points on one line
    ({"segmentation": TRIANGLE}, "outside the annotation's bbox"),
    ({"segmentation": "square"}, "must be a list of polygons or an RLE"),
]


@pytest.mark.parametrize(("bad", "reason"), BAD, ids=[reason for _, reason in BAD])
def test_a_bad_mask_is_an_issue_or_an_error(tmp_path: Path, bad: dict[str, Any], reason: str) -> None:
    good = {"image_id": 1, "category_id": 1, "bbox": bbox_of(SQUARE), "segmentation": SQUARE}
    path = write_coco(tmp_path, [good, {**good, **bad}], images=1)
    data = load_coco_segments(path)
    assert len(data.images[0].objects) == 1
    [issue] = data.issues
    assert issue.file == str(path) and issue.where == "annotations[1] (id 101)"
    assert reason in issue.reason
    where = re.escape("instances.json:annotations[1] (id 101): ")
    with pytest.raises(DataError, match=f"{where}.*{re.escape(reason)}"):
        load_coco_segments(path, on_error="fail")


def test_train_builds_segment_examples_from_segment_coco(three_formats: Path, tmp_path: Path) -> None:
    """``--segment-coco`` with ``--segmentation-weights``: the same examples as :func:`segment_examples`,
    beside the ``detect`` ones of ``--coco``; without the weights the config names the missing flag."""
    weights = write_random_weights(tmp_path / "vae.npz", seed=3, encoder=True)
    cfg = TrainConfig(
        base="unused", out=str(tmp_path / "run"), coco=(str(three_formats),), segment_coco=(str(three_formats),),
        segmentation_weights=str(weights), absent_per_image=0,
    )  # fmt: skip
    examples = build_examples(cfg)
    data = load_coco_segments(three_formats)
    segment = segment_examples(data, MaskEncoder.from_npz(weights), absent_per_image=0)
    assert [e for e in examples if e.prefix.startswith("segment")] == segment
    assert sum(e.prefix.startswith("detect") for e in examples) == 3  # detect: all classes in one prompt
    assert len(segment) == sum(len({o.label for o in im.objects}) for im in data.images)  # segment: one class each
    assert all(" ; " not in e.prefix for e in segment)
    with pytest.raises(ValueError, match="--segment-coco needs --segmentation-weights"):
        TrainConfig(base="unused", out="x", segment_coco=(str(three_formats),))


def test_train_cli_runs_on_segment_coco(tiny_checkpoint: Path, three_formats: Path, tmp_path: Path) -> None:
    weights = write_random_weights(tmp_path / "vae.npz", seed=3, encoder=True)
    out = tmp_path / "run"
    main([
        "train", "--base", str(tiny_checkpoint), "--out", str(out), "--segment-coco", str(three_formats),
        "--segmentation-weights", str(weights), "--max-steps", "2", "--batch-size", "2", "--threads", "1",
    ])  # fmt: skip
    assert json.loads((out / "train_result.json").read_text())["steps"] == 2
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
