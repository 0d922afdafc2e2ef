"""The mask -> ``<seg>`` encoder against big_vision's own code, plus the crop/resize on simple cases.

What the fixture (``fixtures/mask_encoder_bigvision.json``) compares: big_vision's TensorFlow op
``refcoco_mask2str`` (``big_vision/pp/proj/paligemma/segmentation.py``, google-research/big_vision at
``0127fb6b``: crop with ``tf.round(size * bbox)``, ``tf.image.resize(..., 'bilinear', antialias=True)``,
``encode_to_codebook_indices`` with ``_conv_tf`` / ``_resblock_tf`` / ``_get_codebook_indices``) was *run*,
unmodified, with tensorflow-cpu 2.21 in a throwaway venv (not a project dependency), on
``write_random_weights(seed=11, embedding_dim=512, encoder=True)`` and random binary masks and boxes given to
it as uint8 0/255 ``[H, W, 3]`` and float32 ``[y1/H, x1/W, y2/H, x2/W]``. Its suffixes (4 loc + 16 seg
tokens) are the expected values; this test checks that :class:`MaskEncoder` gives the same 16 codewords
and that :func:`crop_box` gives the same crop. The one-off run (400 masks over D = 512, 32 and 8, and a
3x3-kernel variant where TF ``SAME`` padding is asymmetric) agreed on every codeword; one case whose nearest
two codewords were within 1e-5 (relative) was left out of the fixture, since float noise can break such ties.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from paligemma.mask_encoder import MaskEncoder, crop_box, crop_resize
from paligemma.segmentation import MaskDecoder, encoder_weight_shapes, write_random_weights
from paligemma.tokens import SEG_PATTERN

FIXTURE = Path(__file__).parent / "fixtures" / "mask_encoder_bigvision.json"
REAL_FILE_BYTES = 8_479_556  # gs://big_vision/paligemma/vae-oid.npz


@pytest.fixture(scope="module")
def fixture() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(FIXTURE.read_text())
    return data


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory, fixture: dict[str, Any]) -> Path:
    params = fixture["weights"]["write_random_weights"]
    return write_random_weights(tmp_path_factory.mktemp("vae") / "vae-oid.npz", **params)


@pytest.fixture(scope="module")
def encoder(weights_file: Path) -> MaskEncoder:
    return MaskEncoder.from_npz(weights_file)


def _mask(case: dict[str, Any]) -> np.ndarray:
    runs = np.asarray(case["runs"])
    return np.repeat(np.arange(len(runs)) % 2, runs).astype(bool).reshape(case["size"])


# --- against big_vision ----------------------------------------------------------------------------------


def test_regenerated_weights_are_the_fixtures(weights_file: Path, fixture: dict[str, Any]) -> None:
    digest = hashlib.sha256()
    with np.load(weights_file) as npz:
        for key in sorted(npz.files):
            digest.update(key.encode())
            digest.update(np.ascontiguousarray(npz[key]).tobytes())
    assert digest.hexdigest() == fixture["weights"]["sha256_of_arrays"], "write_random_weights drew other values"


def test_codewords_equal_big_vision(encoder: MaskEncoder, fixture: dict[str, Any]) -> None:
    cases = fixture["cases"]
    assert len(cases) >= 20
    masks = [_mask(case) for case in cases]
    crops = np.stack([crop_resize(mask, tuple(case["box_xyxy"])) for mask, case in zip(masks, cases, strict=True)])
    expected = np.array([case["indices"] for case in cases])
    np.testing.assert_array_equal(encoder.encode(crops), expected)
    assert len(np.unique(expected)) > 10  # the weights give varied codewords, so the check has teeth
    for mask, case in zip(masks, cases, strict=True):
        text = encoder.encode_mask(mask, tuple(case["box_xyxy"]))
        assert case["suffix"].endswith(text) and len(SEG_PATTERN.findall(text)) == 16


def test_crop_bounds_equal_big_vision(fixture: dict[str, Any]) -> None:
    for case in fixture["cases"]:
        height, width = case["size"]
        assert list(crop_box(tuple(case["box_xyxy"]), width, height)) == case["crop_yxyx"], case["box_xyxy"]


# --- crop and resize -------------------------------------------------------------------------------------


def test_full_box_of_a_full_mask_is_all_ones() -> None:
    crop = crop_resize(np.ones((30, 50), bool), (0, 0, 50, 30))
    assert crop.shape == (64, 64) and crop.dtype == np.float32
    np.testing.assert_allclose(crop, 1.0, atol=1e-6)


def test_empty_mask_is_all_zeros() -> None:
    np.testing.assert_array_equal(crop_resize(np.zeros((40, 40), np.uint8), (5, 5, 30, 30)), 0.0)


def test_box_at_the_image_edge_crops_only_that_part() -> None:
    mask = np.zeros((20, 40), bool)
    mask[:, 30:] = True  # right quarter
    crop = crop_resize(mask, (20, 0, 40, 20))  # right half, touching the edge
    np.testing.assert_allclose(crop[:, :30], 0.0, atol=1e-6)  # columns 20..29 of 20..39: the left half
    np.testing.assert_allclose(crop[:, 34:], 1.0, atol=1e-6)
    assert crop_box((30.0, -3.0, 45.0, 25.0), 40, 20) == (0, 30, 20, 40)  # past the edge: clipped


def test_upsampling_a_small_crop_keeps_its_halves() -> None:
    mask = np.zeros((4, 4), bool)
    mask[:2] = True  # top half
    crop = crop_resize(mask, (0, 0, 4, 4))
    np.testing.assert_allclose(crop[:24], 1.0, atol=1e-6)
    np.testing.assert_allclose(crop[40:], 0.0, atol=1e-6)
    assert 0.0 < crop[31, 0] < 1.0  # bilinear, not nearest


def test_box_bounds_round_half_to_even_like_tf_round() -> None:
    assert crop_box((4.5, 1.5, 27.5, 16.5), 52, 54) == (2, 4, 16, 28)
    assert crop_box((10.4, 0.6, 20.6, 9.4), 100, 100) == (1, 10, 9, 21)


@pytest.mark.parametrize("box", [(3.2, 0, 3.4, 10), (0, 0, 10, 0), (12, 0, 20, 10)])
def test_boxes_without_pixels_are_value_errors(box: tuple[float, float, float, float]) -> None:
    with pytest.raises(ValueError, match="covers no pixel"):
        crop_resize(np.ones((10, 10), bool), box)


# --- weights and API -------------------------------------------------------------------------------------


def test_encode_shapes(encoder: MaskEncoder) -> None:
    out = encoder.encode(np.zeros((3, 64, 64), np.float32))
    assert out.shape == (3, 16) and out.dtype == np.int64 and ((out >= 0) & (out < 128)).all()
    assert encoder.encode(np.zeros((0, 64, 64))).shape == (0, 16)


def test_full_random_file_has_the_real_files_layout_and_same_decoder(tmp_path: Path) -> None:
    full = write_random_weights(tmp_path / "full.npz", seed=4, encoder=True)
    assert full.stat().st_size == REAL_FILE_BYTES  # same keys, shapes and dtype as the public file
    decoder_only = write_random_weights(tmp_path / "dec.npz", seed=4)
    with np.load(full) as a, np.load(decoder_only) as b:
        assert set(a.files) == (set(b.files) - {"encoder.0.weight"}) | set(encoder_weight_shapes(512))
        for key in b.files:
            if not key.startswith("encoder."):
                np.testing.assert_array_equal(a[key], b[key])
    tokens = np.arange(16)[None]
    np.testing.assert_array_equal(
        MaskDecoder.from_npz(full).decode(tokens), MaskDecoder.from_npz(decoder_only).decode(tokens)
    )


def test_decoder_only_file_is_a_clear_error(tmp_path: Path) -> None:
    path = write_random_weights(tmp_path / "dec.npz", embedding_dim=8)
    with pytest.raises(ValueError, match="no encoder"):
        MaskEncoder.from_npz(path)
