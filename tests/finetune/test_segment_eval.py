"""Segmentation evaluation: mask IoU / mask mAP on hand-made masks, the /segment decoding through an oracle and
through the demo model's real engine, and ``python -m finetune eval --segmentation-weights``."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from transformers import PaliGemmaProcessor

from finetune.data.records import Box, DetectionImage, DetectionSet
from finetune.data.segments import Segment, load_coco_segments, segment_target
from finetune.evaluation.mask_metrics import PredictedMask, mask_scores
from finetune.evaluation.segments import predict_masks
from paligemma.grammar import GrammarSpec
from paligemma.mask_encoder import MaskEncoder
from paligemma.masks import encode_rle
from paligemma.segmentation import MaskDecoder
from paligemma.tokens import SpecialIds
from service.engines.protocol import Generation, GenerationRequest
from tests.finetune.conftest import FakeEngine

VAE = Path(__file__).resolve().parents[2] / "models" / "shapes-vae" / "vae-shapes.npz"
CLASSES = ["circle", "square", "triangle"]


def _mask(y1: int, x1: int, y2: int, x2: int, side: int = 20) -> np.ndarray:
    mask = np.zeros((side, side), dtype=bool)
    mask[y1:y2, x1:x2] = True
    return mask


def _segment(label: str, mask: np.ndarray) -> Segment:
    ys, xs = np.nonzero(mask)
    box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
    return Segment(label, box, segmentation=dict(encode_rle(mask)))


def _pred(label: str, mask: np.ndarray | None, score: float = 0.9, box: Any = (0.0, 0.0, 5.0, 5.0)) -> PredictedMask:
    return PredictedMask(label, box if mask is None else _segment(label, mask).box, score, mask)


SQUARE = _mask(2, 2, 12, 12)  # 10 x 10
CIRCLE = _mask(14, 3, 19, 9)  # 5 x 6 (a block, named circle)


def _dataset(*objects: Segment) -> DetectionSet:
    return DetectionSet([DetectionImage(1, Path("none.png"), 20, 20, list(objects))], ["circle", "square"])


def test_perfect_predictions_score_one() -> None:
    data = _dataset(_segment("square", SQUARE), _segment("circle", CIRCLE))
    scores = mask_scores(data, {1: [_pred("circle", CIRCLE), _pred("square", SQUARE)]}, ["circle", "square"])
    assert scores["mean_iou"] == 1.0 and scores["objects"] == 2 and scores["no_mask"] == 0
    assert scores["mask_map50"] == pytest.approx(1.0) and scores["mask_map"] == pytest.approx(1.0)
    assert scores["box_map50"] == pytest.approx(1.0)
    assert scores["per_class"] == {n: {"mean_iou": 1.0, "ap50": pytest.approx(1.0)} for n in ("circle", "square")}


def test_shifted_mask_has_the_iou_computed_by_hand() -> None:
    data = _dataset(_segment("square", SQUARE))
    shifted = _mask(2, 5, 12, 15)  # 3 px right: overlap 10 x 7 = 70, union 100 + 100 - 70 = 130
    scores = mask_scores(data, {1: [_pred("square", shifted)]}, ["circle", "square"])
    assert scores["mean_iou"] == pytest.approx(70 / 130)
    assert scores["mask_map50"] == pytest.approx(1.0)  # 0.538 passes 0.5 ...
    assert scores["mask_map"] == pytest.approx(0.1)  # ... and no other of COCO's ten thresholds
    assert scores["per_class"]["circle"] == {"mean_iou": None, "ap50": 0.0}  # no circle in the truth


def test_missed_object_no_mask_and_wrong_label_count_zero() -> None:
    data = _dataset(_segment("square", SQUARE), _segment("circle", CIRCLE))
    missed = mask_scores(data, {1: [_pred("square", SQUARE)]}, ["circle", "square"])
    assert missed["mean_iou"] == 0.5 and missed["per_class"]["circle"]["mean_iou"] == 0.0
    no_mask = mask_scores(data, {1: [_pred("square", SQUARE), _pred("circle", None)]}, ["circle", "square"])
    assert no_mask["mean_iou"] == 0.5 and no_mask["no_mask"] == 1 and no_mask["predictions"] == 2
    assert no_mask["per_class"]["circle"]["ap50"] == 0.0  # left out of segm
    swapped = mask_scores(data, {1: [_pred("circle", SQUARE), _pred("square", CIRCLE)]}, ["circle", "square"])
    assert swapped["mean_iou"] == 0.0 and swapped["mask_map50"] == 0.0
    assert swapped["box_map50"] == 0.0


def test_matching_is_one_to_one_and_asked_classes_only() -> None:
    data = _dataset(_segment("square", SQUARE), _segment("square", _mask(2, 4, 12, 14)))
    one = mask_scores(data, {1: [_pred("square", SQUARE, 0.9), _pred("square", SQUARE, 0.8)]}, ["square"])
    assert one["mean_iou"] == pytest.approx((1.0 + 80 / 120) / 2)  # the copy pairs with the other square
    both = mask_scores(data, {1: [_pred("square", SQUARE)]}, ["square"])
    assert both["mean_iou"] == 0.5 and both["objects"] == 2  # one prediction cannot serve two objects
    circle_only = mask_scores(data, {1: [_pred("square", SQUARE)]}, ["circle"])
    assert circle_only["objects"] == 0 and circle_only["mean_iou"] is None and circle_only["mask_map50"] == 0.0


def test_bad_inputs_are_reported() -> None:
    data = _dataset(_segment("square", SQUARE))
    with pytest.raises(ValueError, match="mask of shape"):
        mask_scores(data, {1: [_pred("square", np.ones((5, 5), dtype=bool))]}, ["square"])
    plain = DetectionSet([DetectionImage(1, Path("none.png"), 20, 20, [Box("square", (2, 2, 12, 12))])], ["square"])
    with pytest.raises(TypeError, match="load_coco_segments"):
        mask_scores(plain, {}, ["square"])


@pytest.fixture(scope="module")
def shapes_with_masks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from finetune.data.synth import generate

    return generate(tmp_path_factory.mktemp("shapes-masks"), 4, seed=7, masks=True)


class Recording:
    """Passes requests to ``engine`` and keeps each request and generation."""

    def __init__(self, engine: Any) -> None:
        self.engine, self.calls = engine, []  # type: ignore[var-annotated]

    async def generate(self, request: GenerationRequest) -> Generation:
        generation: Generation = await self.engine.generate(request)
        self.calls.append((request, generation))
        return generation

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


def _asked(request: GenerationRequest) -> list[str]:
    return request.prefix.removeprefix("segment ").split(" ; ")


def _same_as_segment_endpoint(
    engine: Recording, data: DetectionSet, preds: dict[int, list[PredictedMask]], groups: list[list[str]]
) -> None:
    """Each request carries /segment's grammar and budget for its classes, and the answers of an image decode,
    group after group, to /segment's detections for those classes."""
    from service.api.segments import build_segments, default_max_new_tokens

    tokenizer = engine.tokenizer()
    special = SpecialIds.from_tokenizer(tokenizer)
    decoder = MaskDecoder.from_npz(VAE)
    by_pixels = {np.asarray(Image.open(im.path).convert("RGB")).tobytes(): im for im in data.images}
    assert sorted(_asked(r) for r, _ in engine.calls) == sorted(groups * len(data.images))
    served: dict[int, dict[str, list[Any]]] = {im.image_id: {} for im in data.images}
    for request, generation in engine.calls:
        group = _asked(request)
        most = max(sum(o.label in group for o in im.objects) for im in data.images)
        budget = default_max_new_tokens(max(len(group), most), 64, 10**6)
        grammar = GrammarSpec.build(tokenizer, special, tokenizer.eos_token_id, group, segment=True, max_tokens=budget)
        assert (request.prefix, request.max_new_tokens, request.grammar) == (
            f"segment {' ; '.join(group)}",
            budget,
            grammar,
        )
        image = by_pixels[np.asarray(request.image).tobytes()]
        _, parsed, _ = build_segments(generation, image.width, image.height, group, special, tokenizer, decoder)
        served[image.image_id][" ; ".join(group)] = parsed
    for image in data.images:
        ours = preds[image.image_id]
        parsed = [d for group in groups for d in served[image.image_id][" ; ".join(group)]]
        assert [(p.label, p.box, p.score) for p in ours] == [(d.label, d.box, d.score) for d in parsed]
        for p, d in zip(ours, parsed, strict=True):
            assert (p.mask is None) == (d.mask is None) and np.array_equal(np.asarray(p.mask), np.asarray(d.mask))


@pytest.mark.parametrize("per_prompt", [0, 1])
def test_oracle_answers_score_near_the_codebook_round_trip(
    demo_checkpoint: Path, shapes_with_masks: Path, per_prompt: int
) -> None:
    data = load_coco_segments(shapes_with_masks / "annotations.json")
    encoder = MaskEncoder.from_npz(str(VAE))
    by_pixels = {np.asarray(Image.open(im.path).convert("RGB")).tobytes(): im for im in data.images}
    tokenizer = PaliGemmaProcessor.from_pretrained(demo_checkpoint).tokenizer
    oracle = FakeEngine(
        tokenizer, lambda r: segment_target(by_pixels[np.asarray(r.image).tobytes()], _asked(r), encoder)
    )
    engine = Recording(oracle)
    preds, texts = asyncio.run(
        predict_masks(engine, data, CLASSES, MaskDecoder.from_npz(VAE), classes_per_prompt=per_prompt)
    )
    groups = [CLASSES] if per_prompt == 0 else [[c] for c in CLASSES]
    assert len(texts) == 4 * len(groups) and sum("<seg" in t for t in texts) >= 4
    scores = mask_scores(data, preds, CLASSES)
    assert scores["objects"] == sum(len(im.objects) for im in data.images) and scores["no_mask"] == 0
    assert scores["mean_iou"] > 0.85  # the codebook's own round trip is ~0.96 (models/shapes-vae/README.md)
    assert scores["mask_map50"] > 0.9 and scores["box_map50"] > 0.9
    _same_as_segment_endpoint(engine, data, preds, groups)


def test_demo_model_through_the_transformers_engine(demo_checkpoint: Path, shapes_with_masks: Path) -> None:
    from finetune.evaluation.evaluate import open_engine

    data = load_coco_segments(shapes_with_masks / "annotations.json")

    async def run() -> tuple[Recording, dict[int, list[PredictedMask]], list[str]]:
        async with open_engine(demo_checkpoint, "transformers", device="cpu", max_batch_size=4) as real:
            engine = Recording(real)
            decoder = MaskDecoder.from_npz(VAE)
            preds, texts = await predict_masks(engine, data, CLASSES, decoder, classes_per_prompt=1)
            return engine, preds, texts

    engine, preds, texts = asyncio.run(run())
    assert len(texts) == 3 * len(data.images) and sorted(texts) == sorted(g.text for _, g in engine.calls)
    scores = mask_scores(data, preds, CLASSES)
    for key in ("mean_iou", "mask_map", "mask_map50", "box_map50"):
        assert 0.0 <= scores[key] <= 1.0
    _same_as_segment_endpoint(engine, data, preds, [[c] for c in CLASSES])


def test_eval_command_writes_a_segmentation_section(
    demo_checkpoint: Path, shapes_with_masks: Path, tmp_path: Path
) -> None:
    from finetune.__main__ import main

    out = tmp_path / "report"
    main(["eval", "--model", str(demo_checkpoint), "--coco", str(shapes_with_masks / "annotations.json"),
          "--segmentation-weights", str(VAE), "--out", str(out), "--limit", "4", "--pictures", "2"])  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    section = report["segmentation"]
    assert section["images"] == 4 and section["classes"] == CLASSES and "detection" in report
    assert {"mean_iou", "objects", "no_mask", "mask_map", "mask_map50", "box_map50", "per_class"} <= set(section)
    assert 0.0 <= section["mean_iou"] <= 1.0 and set(section["per_class"]) == set(CLASSES)
    assert [Path(p).name for p in section["pictures"]] == ["segment-000.png", "segment-001.png"]
    assert Image.open(section["pictures"][0]).width > 2 * 336  # ground truth and prediction, scaled up
    records = json.loads((out / "predictions.json").read_text())["segmentation"]
    assert section["classes_per_prompt"] == 1  # as --segment-prompt-style per_class (the default) trains
    assert len(records) == 4 and all(len(r["texts"]) == len(CLASSES) and "objects" in r for r in records.values())
