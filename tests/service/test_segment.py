"""``POST /segment``: the route on the tiny checkpoint (transformers engine), and the mask path from real ids.

The tiny random checkpoint rarely emits loc tokens, so the route tests check shapes, statuses and token
budgets; the mask path is checked end to end by feeding the token ids of a real ``segment`` answer
(tokenized with the tiny checkpoint's tokenizer) through :func:`service.api.segments.build_segments`, the
function the route calls, with a random decoder in ``vae-oid.npz``'s layout.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pycocotools import mask as coco_mask

from paligemma import SpecialIds
from paligemma.segmentation import (
    TOKENS_MARGIN,
    TOKENS_PER_OBJECT,
    MaskDecoder,
    paste_mask,
    pixel_box,
    write_random_weights,
)
from service.api.schemas import SegmentResponse
from service.api.segments import build_segments
from service.app import create_app
from service.engines.protocol import Generation
from tests.service.conftest import image_bytes, make_settings
from tests.service.test_api import assert_error

SEGS = [(7 * i + 3) % 128 for i in range(16)]
CAT_BOX = (100, 200, 800, 900)  # y1, x1, y2, x2 bins
ANSWER = (
    "".join(f"<loc{v:04d}>" for v in CAT_BOX)
    + "".join(f"<seg{s:03d}>" for s in SEGS)
    + " cat ; <loc0050><loc0050><loc0500><loc0400><seg001><seg002> dog"  # a cut seg run: box without mask
)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random decoder weights whose last bias is shifted so about half of the 64x64 mask of ``SEGS`` is set
    (plain random init gives a nearly constant output: all in or all out)."""
    path = write_random_weights(tmp_path_factory.mktemp("vae") / "vae-oid.npz", embedding_dim=32)
    with np.load(path) as npz:
        arrays = {key: npz[key] for key in npz.files}
    arrays["decoder.12.bias"] = arrays["decoder.12.bias"] - np.median(MaskDecoder(arrays).decode([SEGS])[0])
    with path.open("wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]
    return path


@pytest.fixture(scope="module")
def seg_client(tiny_checkpoint: Path, weights: Path) -> Iterator[TestClient]:
    settings = make_settings(tiny_checkpoint, segmentation_weights=weights, max_new_tokens_limit=128)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def _tokenizer(client: TestClient) -> Any:
    return client.app.state.service.engine.tokenizer()  # type: ignore[attr-defined]


def test_not_configured_is_503_with_how_to(client: TestClient, png: bytes) -> None:
    response = client.post("/segment", files={"image": ("x.png", png)}, data={"objects": "cat"})
    error = assert_error(response, 503, "segmentation_not_configured")
    assert "PALIGEMMA_SEGMENTATION_WEIGHTS" in error["message"] and "--segmentation-weights" in error["message"]
    assert "vae-oid.npz" in error["message"]
    assert "retry-after" not in response.headers  # retrying will not help
    assert client.get("/readyz").status_code == 200  # the rest of the service is unaffected


def test_missing_weights_file_fails_startup(tiny_checkpoint: Path, tmp_path: Path) -> None:
    settings = make_settings(tiny_checkpoint, segmentation_weights=tmp_path / "nope.npz")
    with pytest.raises(FileNotFoundError, match="vae-oid.npz"), TestClient(create_app(settings)):
        pass


def test_segment_multipart_default_budget(seg_client: TestClient) -> None:
    response = seg_client.post(
        "/segment", files={"image": ("x.png", image_bytes((90, 30)))}, data={"objects": ["cat", "dog"]}
    )
    assert response.status_code == 200, response.text
    body = SegmentResponse.model_validate(response.json())
    assert body.image.width == 90 and body.image.height == 30
    # no max_new_tokens: room for one mask per object (2 * 22 + 8 = 52), above the server default of 6
    assert 0 < body.usage.completion_tokens <= TOKENS_PER_OBJECT * 2 + TOKENS_MARGIN
    for det in body.detections:
        assert det.mask is None or det.mask.rle.size == [30, 90]
    assert set(response.json()) == {"detections", "image", "model", "text", "usage", "latency_ms"}


def test_segment_json_with_limits(seg_client: TestClient, png: bytes) -> None:
    import base64

    body = {
        "image": base64.b64encode(png).decode(),
        "objects": "cat",
        "max_new_tokens": 3,
        "polygons": True,
        "constrained": False,
    }
    response = seg_client.post("/segment", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 3
    assert_error(seg_client.post("/segment", json={**body, "max_new_tokens": 129}), 422, "validation_error")
    assert_error(seg_client.post("/segment", json={**body, "polygons": "maybe"}), 422, "validation_error")
    assert_error(seg_client.post("/segment", json={"objects": "cat"}), 422, "validation_error")


def test_segment_metrics_and_openapi(seg_client: TestClient) -> None:
    metrics = seg_client.get("/metrics").text
    assert 'paligemma_generated_tokens_total{endpoint="/segment"}' in metrics
    spec = seg_client.get("/openapi.json").json()
    operation = spec["paths"]["/segment"]["post"]
    assert set(operation["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
    assert "polygons" in operation["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert set(operation["responses"]["200"]["content"]) == {"application/json", "image/png"}
    assert any(p["name"] == "annotated" and p["in"] == "query" for p in operation["parameters"])
    example = spec["components"]["schemas"]["SegmentResponse"]["examples"][0]
    SegmentResponse.model_validate(example)
    assert example["detections"][0]["mask"]["rle"]["size"] == [example["image"]["height"], example["image"]["width"]]


def test_masks_from_real_segment_token_ids(seg_client: TestClient, weights: Path) -> None:
    """The ids of a real ``segment`` answer -> the route's builder -> COCO RLE that pycocotools decodes to
    exactly the decoder's 64x64 mask pasted into the box; the cut seg run keeps its box with mask null."""
    tokenizer = _tokenizer(seg_client)
    ids = tuple(tokenizer(ANSWER, add_special_tokens=False).input_ids)
    assert len(ids) >= 4 + 16 + 1 + 4 + 2 + 1
    logprobs = tuple(-0.1 * (i % 3) for i in range(len(ids)))
    generation = Generation(token_ids=ids, text=tokenizer.decode(ids), logprobs=logprobs, finish_reason="stop")
    width, height = 160, 120
    decoder = MaskDecoder.from_npz(weights)
    special = SpecialIds.from_tokenizer(tokenizer)
    detections, parsed, dropped = build_segments(
        generation, width, height, ["cat", "dog"], special, tokenizer, decoder, polygons=True
    )
    assert dropped == 0 and [d.label for d in detections] == ["cat", "dog"]
    cat, dog = detections
    assert dog.mask is None and parsed[1].mask is None
    assert cat.mask is not None and cat.score is not None
    loc_and_label = [lp for i, lp in enumerate(logprobs) if i < 4 or i == 20]
    assert cat.score == pytest.approx(math.exp(sum(loc_and_label) / 5), abs=1e-5)

    rle = cat.mask.rle.model_dump()
    decoded = coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)
    assert decoded.shape == (height, width)
    box = (cat.box.x1, cat.box.y1, cat.box.x2, cat.box.y2)
    expected = paste_mask(decoder.decode([SEGS])[0], box, width, height)
    np.testing.assert_array_equal(decoded, expected)
    np.testing.assert_array_equal(decoded, parsed[0].mask)
    x1, y1, x2, y2 = pixel_box(box, width, height)
    inside = np.zeros_like(decoded)
    inside[y1:y2, x1:x2] = True
    assert not (decoded & ~inside).any()  # nothing outside the box
    assert 0.2 < cat.mask.area / inside.sum() < 0.8 and cat.mask.area == decoded.sum()
    assert cat.mask.polygons
    points = np.concatenate([np.reshape(p, (-1, 2)) for p in cat.mask.polygons])
    assert (points[:, 0] >= x1).all() and (points[:, 0] < x2).all()
    assert (points[:, 1] >= y1).all() and (points[:, 1] < y2).all()
