"""``/segment`` through the real vLLM engine (CPU build), served by a real uvicorn on loopback.

The varied tiny checkpoint's output is noise, so the route is checked for shape, budget, adapters and the
annotated PNG; the mask path is checked with the vLLM engine's own tokenizer on the ids of a real
``segment`` answer, through the route's builder (as tests/service/test_segment.py does for transformers).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from paligemma import SpecialIds
from paligemma.segmentation import TOKENS_MARGIN, TOKENS_PER_OBJECT, MaskDecoder
from service.api.schemas import SegmentResponse
from service.api.segments import build_segments
from service.app import create_app
from service.engines.protocol import Generation
from tests.integration.conftest import vllm_settings
from tests.integration.test_vllm_service import _png, _Server
from tests.service.test_segment import ANSWER, SEGS, weights  # noqa: F401  (module fixture)

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def seg_server(varied_checkpoint: Path, lora_adapter: Path, weights: Path) -> Iterator[_Server]:  # noqa: F811
    settings = vllm_settings(varied_checkpoint, lora_adapter, segmentation_weights=weights)
    with _Server(create_app(settings)) as running:
        yield running


def test_segment_through_vllm(seg_server: _Server) -> None:
    files = {"image": ("x.png", _png(5), "image/png")}
    response = httpx.post(f"{seg_server.url}/segment", files=files, data={"objects": "cat ; dog"}, timeout=120)
    assert response.status_code == 200, response.text
    body = SegmentResponse.model_validate(response.json())
    assert body.image.width == 160 and body.image.height == 90
    assert 0 < body.usage.completion_tokens <= TOKENS_PER_OBJECT * 2 + TOKENS_MARGIN  # the /segment default budget
    for det in body.detections:
        assert det.mask is None or det.mask.rle.size == [90, 160]
    adapted = httpx.post(
        f"{seg_server.url}/segment", files=files, data={"objects": "cat", "adapter": "shapes"}, timeout=120
    )
    assert adapted.status_code == 200, adapted.text
    png = httpx.post(
        f"{seg_server.url}/segment", params={"annotated": "true"}, files=files, data={"objects": "cat"}, timeout=120
    )
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size == (160, 90)


def test_masks_from_real_ids_with_the_vllm_tokenizer(seg_server: _Server, weights: Path) -> None:  # noqa: F811
    tokenizer = seg_server.engine.tokenizer()
    ids = tuple(tokenizer(ANSWER, add_special_tokens=False).input_ids)
    generation = Generation(ids, tokenizer.decode(ids), (0.0,) * len(ids), "stop")
    decoder = MaskDecoder.from_npz(weights)
    detections, parsed, _ = build_segments(
        generation, 160, 120, ["cat", "dog"], SpecialIds.from_tokenizer(tokenizer), tokenizer, decoder
    )
    assert [d.label for d in detections] == ["cat", "dog"] and detections[1].mask is None
    assert detections[0].mask is not None and parsed[0].mask is not None
    assert detections[0].mask.area == int(np.sum(parsed[0].mask)) > 0
    assert parsed[0].seg_tokens == tuple(SEGS)
