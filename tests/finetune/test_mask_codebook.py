"""The shapes demo's mask codebook: the committed file is a drop-in ``vae-oid.npz`` and matches its card."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from finetune.data.synth import SHAPES
from finetune.recipes.mask_codebook import CARD_NAME, WEIGHTS_NAME, CodebookConfig, round_trip_iou, run, sample
from paligemma.mask_encoder import MaskEncoder
from paligemma.segmentation import MaskDecoder, encoder_weight_shapes, weight_shapes

SHIPPED = Path(__file__).parents[2] / "models" / "shapes-vae"


def test_shipped_codebook_is_a_drop_in_and_round_trips_as_its_card_says() -> None:
    card = json.loads((SHIPPED / CARD_NAME).read_text())
    path = SHIPPED / WEIGHTS_NAME
    dim = card["config"]["embedding_dim"]
    with np.load(path) as npz:  # every key of big_vision's file, same shapes (but D), float32
        expected = weight_shapes(dim) | encoder_weight_shapes(dim)
        assert {key: npz[key].shape for key in npz.files} == expected
        assert {npz[key].dtype for key in npz.files} == {np.dtype(np.float32)}
    MaskEncoder.from_npz(path), MaskDecoder.from_npz(path)
    measured = round_trip_iou(path, card["heldout"]["seed"], card["heldout"]["per_kind"])
    assert set(measured) == set(SHAPES)
    for kind, figures in measured.items():
        for level in ("crop", "box"):
            assert figures[level] == pytest.approx(card["iou"][kind][level], abs=0.02), (kind, level)


def test_samples_are_nonempty_with_tight_boxes() -> None:
    rng = random.Random(3)
    for kind in SHAPES * 5:
        mask, (x1, y1, x2, y2) = sample(rng, kind)
        assert mask.shape == (224, 224) and mask[y1:y2, x1:x2].sum() == mask.sum() > 0
        assert mask[y1].any() and mask[y2 - 1].any() and mask[:, x1].any() and mask[:, x2 - 1].any()


def test_a_tiny_run_is_bit_identical_twice_and_loads(tmp_path: Path) -> None:
    cfg = CodebookConfig(steps=20, batch_size=4, embedding_dim=8, heldout_per_kind=2)
    first, second = (run(tmp_path / name, cfg, progress=False) for name in ("a", "b"))
    with np.load(first) as a, np.load(second) as b:
        assert a.files == b.files
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    cards = [json.loads((path.parent / CARD_NAME).read_text()) for path in (first, second)]
    assert cards[0]["iou"] == cards[1]["iou"] and cards[0]["loss_last_50"] == cards[1]["loss_last_50"]
    ids = MaskEncoder.from_npz(first).encode(np.zeros((2, 64, 64), np.float32))
    assert ids.shape == (2, 16) and MaskDecoder.from_npz(first).decode(ids).shape == (2, 64, 64)
