"""``?annotated=true`` (the image with the detections drawn, as PNG) and the page at ``GET /``.

Boxes need a model that emits loc tokens: ``demo_checkpoint`` is the committed demo model (models/demo,
see tests/demo_model.py), served by the real transformers engine. Masks are drawn from the ids of a real
``segment`` answer (as in test_segment.py).
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from paligemma import SpecialIds
from paligemma.draw import PREDICTION, draw_detections
from paligemma.segmentation import MaskDecoder
from service.api.annotate import annotated_png, from_response
from service.api.schemas import Detection
from service.api.segments import build_segments
from service.app import create_app
from service.engines.protocol import Generation
from service.images import ImageLimits
from tests.demo_model import find_detection
from tests.service.conftest import image_bytes, make_settings
from tests.service.test_segment import ANSWER, weights  # noqa: F401  (module fixture)

STATIC_PAGE = Path(__file__).resolve().parents[2] / "service" / "static" / "index.html"


@pytest.fixture(scope="module")
def shapes_client(demo_checkpoint: Path) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(demo_checkpoint, max_new_tokens=24))) as test_client:
        yield test_client


def _png(response: Any) -> Image.Image:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.content.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return image


def test_annotated_detect_draws_the_boxes(shapes_client: TestClient) -> None:
    """The PNG is the JSON answer's boxes drawn on the upload: compared with drawing them here, pixel for
    pixel, and each box's outline is blue where the drawing puts it (PIL's rectangle truncates float
    coordinates and draws the outline inside them)."""

    def detect(png: bytes, name: str) -> dict[str, Any]:
        return dict(shapes_client.post("/detect", files={"image": ("x.png", png)}, data={"objects": name}).json())

    png, name = find_detection(detect)
    answer = detect(png, name)
    response = shapes_client.post("/detect?annotated=true", files={"image": ("x.png", png)}, data={"objects": name})
    drawn = np.asarray(_png(response).convert("RGB"), dtype=np.int16)
    original = Image.open(io.BytesIO(png)).convert("RGB")
    assert drawn.shape == (original.height, original.width, 3)  # same size as the upload
    assert response.headers["x-detections"] == str(len(answer["detections"]))
    detections = [Detection.model_validate(d) for d in answer["detections"]]
    expected = np.asarray(draw_detections(original, from_response(detections)), dtype=np.int16)
    assert (drawn == expected).all()
    assert (drawn != np.asarray(original, dtype=np.int16)).any()
    blue = np.abs(drawn - np.asarray(PREDICTION)).sum(axis=2) < 30
    for det in answer["detections"]:
        x1, y1, x2, y2 = (int(det["box"][k]) for k in ("x1", "y1", "x2", "y2"))
        if y2 - y1 >= 24:  # taller than a caption drawn inside the box, which could cover the bottom edge
            assert blue[min(y2, drawn.shape[0] - 1), x1 : x2 + 1].mean() > 0.5  # the bottom edge is blue


def test_annotated_without_detections_is_the_image(shapes_client: TestClient) -> None:
    upload = image_bytes((75, 40), fmt="JPEG")
    response = shapes_client.post(
        "/detect", params={"annotated": "true"}, files={"image": ("x.jpg", upload)}, data={"objects": "zebra"}
    )
    image = _png(response)
    assert image.size == (75, 40) and image.mode == "RGB"


def test_annotated_segment_draws_masks(weights: Path, tiny_checkpoint: Path) -> None:  # noqa: F811
    """The segment route's builder and renderer on a real segment answer: the mask is tinted blue."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    ids = tuple(tokenizer(ANSWER, add_special_tokens=False).input_ids)
    generation = Generation(ids, tokenizer.decode(ids), (-0.05,) * len(ids), "stop")
    special, decoder = SpecialIds.from_tokenizer(tokenizer), MaskDecoder.from_npz(weights)
    _, parsed, _ = build_segments(generation, 160, 120, ["cat", "dog"], special, tokenizer, decoder)
    buffer = io.BytesIO()
    Image.new("RGB", (160, 120), (128, 128, 128)).save(buffer, format="PNG")
    limits = ImageLimits(max_bytes=10**6, max_pixels=10**6, max_aspect_ratio=20)
    response = asyncio.run(annotated_png(buffer.getvalue(), limits, parsed))
    drawn = np.asarray(Image.open(io.BytesIO(bytes(response.body))).convert("RGB"))
    mask = parsed[0].mask
    assert drawn.shape == (120, 160, 3) and mask is not None
    inner = mask.copy()
    inner[:30, :] = False  # away from the label caption
    assert (drawn[inner][:, 2] > 128).all() and (drawn[inner][:, 0] < 128).all()  # tinted toward blue
    assert (drawn[:10, 150:] == 128).all()  # the top right corner, outside both boxes, is untouched


def test_page_is_served(client: TestClient) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert response.text == STATIC_PAGE.read_text()
    assert 'id="image-input"' in response.text
    assert "http://" not in response.text.replace("http://localhost", "") and "https://" not in response.text
