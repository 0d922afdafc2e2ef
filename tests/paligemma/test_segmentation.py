"""The seg-token mask decoder (random weights, real key layout), paste-into-box, and mask JSON (RLE, polygons)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from paligemma import parse_detections
from paligemma.masks import decode_rle, encode_rle, mask_polygons, mask_to_json
from paligemma.segmentation import (
    CODEBOOK_KEY,
    WEIGHTS_ENV,
    WEIGHTS_FLAG,
    WEIGHTS_URL,
    MaskDecoder,
    attach_masks,
    load_weights,
    paste_mask,
    pixel_box,
    weight_shapes,
    write_random_weights,
)
from paligemma.tokens import encode_box

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools.decode
D = 32  # small codebook width keeps the file tiny; the real D is read from vae-oid.npz


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_weights(tmp_path_factory.mktemp("vae") / "vae-oid.npz", embedding_dim=D, seed=0)


@pytest.fixture(scope="module")
def decoder(weights_file: Path) -> MaskDecoder:
    return MaskDecoder.from_npz(weights_file)


# --- decoder -------------------------------------------------------------------------------------------


def test_decode_shapes_and_dtype(decoder: MaskDecoder) -> None:
    tokens = np.arange(48).reshape(3, 16) % 128
    logits = decoder.decode(tokens)
    assert logits.shape == (3, 64, 64) and logits.dtype == np.float32
    assert np.isfinite(logits).all()
    assert decoder.decode([list(range(16))]).shape == (1, 64, 64)
    assert decoder.decode(np.zeros((0, 16), int)).shape == (0, 64, 64)


def test_decode_is_deterministic_and_batch_independent(weights_file: Path, decoder: MaskDecoder) -> None:
    tokens = np.random.default_rng(1).integers(0, 128, size=(4, 16))
    first = decoder.decode(tokens)
    np.testing.assert_array_equal(first, decoder.decode(tokens))
    np.testing.assert_array_equal(first, MaskDecoder.from_npz(weights_file).decode(tokens))
    np.testing.assert_allclose(first[2], decoder.decode(tokens[2:3])[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(first[0], first[1])  # different codewords, different masks


def test_decode_uses_row_major_4x4_grid(decoder: MaskDecoder) -> None:
    """Changing only the top-left token changes the top-left of the mask more than the bottom-right."""
    base = np.zeros((1, 16), int)
    other = base.copy()
    other[0, 0] = 77
    diff = np.abs(decoder.decode(base)[0] - decoder.decode(other)[0])
    assert diff[:16, :16].sum() > 10 * diff[48:, 48:].sum()


@pytest.mark.parametrize("bad", [[[-1] * 16], [[128] * 16]])
def test_decode_rejects_out_of_range_indices(decoder: MaskDecoder, bad: list[list[int]]) -> None:
    with pytest.raises(ValueError, match="seg indices"):
        decoder.decode(bad)


# --- weights file ----------------------------------------------------------------------------------------


def test_npz_key_layout_round_trip(weights_file: Path, decoder: MaskDecoder) -> None:
    with np.load(weights_file) as npz:
        keys = set(npz.files)
        expected = weight_shapes(D)
        assert keys - {"encoder.0.weight"} == set(expected)
        for key, shape in expected.items():
            assert npz[key].shape == shape, key
        state = decoder.module.state_dict()
        assert set(state) == set(expected)  # the module loads the file's keys with strict=True
        for key in expected:
            np.testing.assert_array_equal(state[key].numpy(), npz[key])
    assert expected[CODEBOOK_KEY] == (128, D)
    assert expected["decoder.4.weight"] == (128, 128, 4, 4)  # ConvTranspose2d: [in, out, k, k]
    assert expected["decoder.10.weight"] == (32, 16, 4, 4)
    assert expected["decoder.12.weight"] == (1, 16, 1, 1)
    assert decoder.embedding_dim == D and decoder.num_codes == 128


def test_embedding_dim_is_read_from_the_file(tmp_path: Path) -> None:
    path = write_random_weights(tmp_path / "w.npz", embedding_dim=8, seed=3)
    assert MaskDecoder.from_npz(path).decode([[5] * 16]).shape == (1, 64, 64)


def test_missing_file_error_says_where_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        MaskDecoder.from_npz(tmp_path / "nope.npz")
    for needle in (WEIGHTS_URL, WEIGHTS_ENV, WEIGHTS_FLAG):
        assert needle in str(info.value)


@pytest.mark.parametrize("path", [None, ""])
def test_unconfigured_path_is_a_value_error(path: str | None) -> None:
    with pytest.raises(ValueError, match=WEIGHTS_ENV):
        load_weights(path)


def test_invalid_files_are_value_errors(tmp_path: Path, weights_file: Path) -> None:
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a valid"):
        load_weights(junk)
    with np.load(weights_file) as npz:
        arrays = dict(npz)
    del arrays["decoder.8.bias"]
    np.savez(tmp_path / "partial.npz", **arrays)
    with pytest.raises(ValueError, match=r"decoder\.8\.bias"):
        load_weights(tmp_path / "partial.npz")
    arrays["decoder.8.bias"] = np.zeros(3, np.float32)
    np.savez(tmp_path / "shape.npz", **arrays)
    with pytest.raises(ValueError, match="expected"):
        load_weights(tmp_path / "shape.npz")


# --- paste into the box --------------------------------------------------------------------------------


def test_paste_fills_exactly_the_integer_box() -> None:
    mask = paste_mask(np.ones((64, 64), np.float32), (10.7, 5.2, 30.9, 20.0), width=50, height=40)
    assert mask is not None and mask.shape == (40, 50) and mask.dtype == bool
    expected = np.zeros((40, 50), bool)
    expected[5:20, 10:30] = True  # int() of each coordinate, as in the evaluator
    np.testing.assert_array_equal(mask, expected)


def test_paste_keeps_the_mask_shape_inside_the_box() -> None:
    logits = -np.ones((64, 64), np.float32)
    logits[:, :32] = 1.0  # left half inside
    mask = paste_mask(logits, (0, 0, 100, 50), width=200, height=100)
    assert mask is not None
    assert mask[:50, :49].all() and not mask[:50, 51:].any() and not mask[50:].any()


def test_paste_clips_to_the_image_and_skips_empty_boxes() -> None:
    ones = np.ones((64, 64), np.float32)
    assert paste_mask(ones, (3.2, 4.0, 3.9, 9.0), 20, 20) is None  # int box has zero width
    assert paste_mask(ones, (25, 0, 40, 10), 20, 20) is None  # entirely outside
    assert pixel_box((-5.0, -1.0, 30.0, 12.5), 20, 10) == (0, 0, 20, 10)
    mask = paste_mask(ones, (-5.0, -1.0, 30.0, 12.5), 20, 10)
    assert mask is not None and mask.all()


def test_attach_masks_from_parsed_segment_output(decoder: MaskDecoder) -> None:
    width, height = 120, 80
    segs = "".join(f"<seg{i:03d}>" for i in range(16))
    text = (
        f"{encode_box(12, 8, 60, 50, width, height)}{segs} cat ; "
        f"{encode_box(70, 10, 110, 70, width, height)} dog ; "
        f"<loc0100><loc0100><loc0101><loc0101>{segs} speck"
    )
    cat, dog, speck = parse_detections(text, width, height)
    logits = decoder.decode([cat.seg_tokens])[0]  # type: ignore[list-item]
    assert attach_masks([cat, dog, speck], decoder, width, height) == [cat, dog, speck]
    assert dog.mask is None  # no seg tokens
    assert speck.mask is None  # one-bin box: empty in pixels, skipped
    x1, y1, x2, y2 = pixel_box(cat.box, width, height)
    np.testing.assert_array_equal(cat.mask, paste_mask(logits, cat.box, width, height))
    outside = cat.mask.copy()
    outside[y1:y2, x1:x2] = False
    assert not outside.any()  # nothing outside the box


# --- mask JSON -------------------------------------------------------------------------------------------


def _disk(height: int, width: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:height, :width]
    return np.asarray((yy - cy) ** 2 + (xx - cx) ** 2 <= r**2)


@pytest.mark.parametrize(
    "mask",
    [
        np.zeros((7, 5), bool),
        np.ones((3, 9), bool),
        _disk(40, 60, 20, 25, 12) | _disk(40, 60, 5, 55, 3),
        np.random.default_rng(0).random((33, 17)) > 0.5,
    ],
)
def test_rle_round_trip_with_pycocotools(mask: np.ndarray) -> None:
    from pycocotools import mask as coco_mask

    rle = encode_rle(mask)
    assert rle["size"] == list(mask.shape) and isinstance(rle["counts"], str)
    np.testing.assert_array_equal(decode_rle(rle), mask)
    as_bytes = {"size": rle["size"], "counts": rle["counts"].encode()}
    np.testing.assert_array_equal(coco_mask.decode(as_bytes).astype(bool), mask)
    assert int(coco_mask.area(as_bytes)) == int(mask.sum()) == mask_to_json(mask)["area"]


def test_mask_json_is_plain_json() -> None:
    import json

    mask = _disk(30, 40, 15, 20, 8)
    payload = mask_to_json(mask, polygons=True)
    assert json.loads(json.dumps(payload)) == payload
    assert set(payload) == {"rle", "area", "polygons"} and set(mask_to_json(mask)) == {"rle", "area"}
    with pytest.raises(ValueError, match="2-D"):
        encode_rle(np.zeros((2, 2, 2), bool))


def test_polygons_trace_each_part() -> None:
    from pycocotools import mask as coco_mask

    mask = np.zeros((40, 60), bool)
    mask[10:30, 20:50] = True
    mask[2:6, 2:6] = True
    polygons = mask_polygons(mask)
    assert len(polygons) == 2 and all(len(p) % 2 == 0 and len(p) >= 6 for p in polygons)
    corners = sorted(sorted(zip(p[::2], p[1::2], strict=True)) for p in polygons)
    assert corners == [[(2, 2), (2, 5), (5, 2), (5, 5)], [(20, 10), (20, 29), (49, 10), (49, 29)]]
    for polygon in polygons:
        xs, ys = polygon[::2], polygon[1::2]
        assert mask[ys, xs].all()  # vertices are mask pixels
    raster = coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(polygons, 40, 60))).astype(bool)
    iou = (raster & mask).sum() / (raster | mask).sum()
    assert iou > 0.8
    assert mask_polygons(np.zeros((5, 5), bool)) == []
