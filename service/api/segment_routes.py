"""``POST /segment``: boxes + COCO RLE masks, or an annotated PNG.

``/segment`` is ``/detect`` with the ``segment`` prefix: same fields (plus ``polygons``), same boxes,
labels and scores, and per detection a ``mask`` decoded from the model's 16 ``<seg>`` tokens by the mask
decoder loaded at startup (:mod:`service.api.segments`). Any engine works: the masks are made here from the
generated token ids.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response

from paligemma import prompts
from paligemma.segmentation import MaskDecoder
from service.api.annotate import ANNOTATED, PNG_RESPONSE, annotated_png
from service.api.intake import read_request
from service.api.routes import ERROR_RESPONSES, body_docs, decode_and_generate, elapsed_ms, usage_of
from service.api.schemas import ImageInfo, SegmentJSON, SegmentParams, SegmentResponse
from service.api.segments import SegmentationNotConfigured, build_segments, default_max_new_tokens
from service.deps import EngineDep, StateDep, state_of
from service.errors import Unavailable

router = APIRouter()


async def get_mask_decoder(request: Request) -> MaskDecoder:
    """The decoder loaded at startup, or 503 ``segmentation_not_configured`` (before the body is read)."""
    decoder = state_of(request).mask_decoder
    if decoder is None:
        raise SegmentationNotConfigured()
    return decoder


DecoderDep = Annotated[MaskDecoder, Depends(get_mask_decoder)]
_SEGMENT_ERRORS = {
    **ERROR_RESPONSES,
    503: {
        **ERROR_RESPONSES[503],
        "description": "Model not ready, overloaded or unavailable; or `segmentation_not_configured`: the server "
        "was started without the mask decoder weights (--segmentation-weights / PALIGEMMA_SEGMENTATION_WEIGHTS)",
    },
}


@router.post(
    "/segment",
    response_model=SegmentResponse,
    responses={**_SEGMENT_ERRORS, **PNG_RESPONSE},
    openapi_extra=body_docs(SegmentParams, SegmentJSON),
    summary="Boxes and masks for the named objects",
    tags=["inference"],
)
async def segment(
    request: Request, state: StateDep, engine: EngineDep, decoder: DecoderDep, annotated: bool = ANNOTATED
) -> SegmentResponse | Response:
    """Segment objects: ``/detect``'s boxes, labels and scores, plus per detection a ``mask``.

    ``mask.rle`` is COCO compressed RLE of the whole image (``pycocotools.mask.decode`` reads it),
    ``mask.area`` its pixel count, and with ``polygons=true`` ``mask.polygons`` the outer boundaries.
    ``mask`` is null when the model did not emit exactly 16 ``<seg>`` tokens for that object.
    ``max_new_tokens`` defaults to enough for one mask per object (22 tokens each), within the server limit.
    """
    start = time.perf_counter()
    params, data = await read_request(request, SegmentParams, state.limits)
    objects = prompts.split_objects(params.objects)
    prefix = prompts.segment(objects)
    settings = state.settings
    budget = default_max_new_tokens(len(objects), settings.max_new_tokens, settings.max_new_tokens_limit)
    upload, generation = await decode_and_generate(
        request, state, engine, prefix, params, data, budget, labels=objects, segment=True
    )
    if state.special_ids is None:
        raise Unavailable()
    detections, parsed, dropped = await asyncio.to_thread(
        build_segments,
        generation,
        upload.width,
        upload.height,
        objects,
        state.special_ids,
        engine.tokenizer(),
        decoder,
        polygons=params.polygons,
    )
    state.metrics.detections.observe(len(detections))
    state.metrics.detections_dropped.labels("no_label").inc(dropped)
    if annotated:
        return await annotated_png(data, state.limits, parsed)
    return SegmentResponse(
        detections=detections,
        image=ImageInfo(width=upload.width, height=upload.height),
        model=engine.model_name,
        text=generation.text,
        usage=usage_of(generation),
        latency_ms=elapsed_ms(start),
    )

