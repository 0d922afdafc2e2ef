"""``?annotated=true``: the uploaded image with the detections drawn on it, as PNG instead of JSON.

Drawing is :func:`paligemma.draw.draw_detections` (predictions in blue, ``label score`` captions, masks
tinted), on the decoded image itself: EXIF rotation applied, original size, so the picture matches the
pixel boxes of the JSON answer. Rendering and PNG encoding run in a worker thread.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import Query, Response

from paligemma.draw import Drawable, draw_detections
from service.api.schemas import Detection
from service.images import ImageLimits, decode_image, image_bytes

ANNOTATED = Query(
    False,
    description="true: answer with the image (PNG) with boxes, labels, scores and masks drawn, instead of JSON",
)
PNG_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "JSON (the default), or with `annotated=true` the uploaded image with the detections "
        "drawn (PNG, same size as the upload after EXIF rotation; header `X-Detections`: how many were drawn)",
        "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@dataclass(frozen=True)
class _Drawn:
    label: str | None
    box: tuple[float, float, float, float]
    score: float | None = None
    mask: Any | None = None


def from_response(detections: Sequence[Detection]) -> list[Drawable]:
    """Response detections (pixel boxes) as things ``draw_detections`` can draw."""
    return [_Drawn(d.label, (d.box.x1, d.box.y1, d.box.x2, d.box.y2), d.score) for d in detections]


def _render(data: bytes | str, limits: ImageLimits, detections: Sequence[Drawable]) -> bytes:
    buffer = io.BytesIO()
    image = decode_image(image_bytes(data, limits.max_bytes), limits)
    draw_detections(image, detections).save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


async def annotated_png(data: bytes | str, limits: ImageLimits, detections: Sequence[Drawable]) -> Response:
    """The PNG response: the upload decoded again at full size (the engine only saw the model's input) and
    drawn on, off the event loop."""
    png = await asyncio.to_thread(_render, data, limits, detections)
    return Response(png, media_type="image/png", headers={"X-Detections": str(len(detections))})
