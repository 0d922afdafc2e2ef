"""Generated token ids -> ``/segment`` detections with masks, and the mask decoder's life on the app.

A ``segment`` answer is ``<loc>x4 <seg>x16 label`` per object. The boxes, labels and scores are exactly
``/detect``'s (:func:`service.api.detections.labelled_detections`); each detection whose seg run has 16 tokens
is decoded by big_vision's VQ-VAE decoder (:class:`paligemma.segmentation.MaskDecoder`), pasted into its
box and encoded as COCO RLE (:func:`paligemma.masks.mask_to_json`). The decoder weights (``vae-oid.npz``)
are a download of their own, so the setting is optional: without it ``/segment`` answers 503
``segmentation_not_configured`` and everything else is served as usual.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from paligemma import Detection as ParsedDetection
from paligemma import SpecialIds
from paligemma.masks import mask_to_json
from paligemma.segmentation import (
    WEIGHTS_ENV,
    WEIGHTS_FLAG,
    WEIGHTS_HTTPS_URL,
    MaskDecoder,
    answer_tokens,
    attach_masks,
)
from service.api.detections import labelled_detections, to_response
from service.api.schemas import Mask, SegmentDetection
from service.engines.protocol import Generation
from service.errors import ServiceError
from service.settings import Settings

log = logging.getLogger(__name__)


class SegmentationNotConfigured(ServiceError):
    """``/segment`` on a server started without the mask decoder weights; retrying will not help."""

    status = 503
    default_code = "segmentation_not_configured"
    default_message = (
        "segmentation is not configured on this server: download big_vision's mask decoder weights "
        f"(vae-oid.npz, {WEIGHTS_HTTPS_URL}) and start the service with {WEIGHTS_ENV}=/path/to/vae-oid.npz "
        f"or {WEIGHTS_FLAG} /path/to/vae-oid.npz"
    )


async def load_mask_decoder(settings: Settings) -> MaskDecoder | None:
    """The decoder named by ``settings.segmentation_weights`` (read in a worker thread), or None when unset.

    A configured path that is missing or not a valid weights file fails startup with the loader's message,
    which says where to get the file: the operator asked for segmentation, so serving without it would hide
    the mistake.
    """
    path = settings.segmentation_weights
    if path is None:
        log.info("segmentation off: set %s (or %s) to serve /segment", WEIGHTS_ENV, WEIGHTS_FLAG)
        return None
    decoder = await asyncio.to_thread(MaskDecoder.from_npz, path)
    log.info("segmentation on: mask decoder from %s (codebook %d x %d)", path, decoder.num_codes, decoder.embedding_dim)
    return decoder


def default_max_new_tokens(num_objects: int, default: int, limit: int) -> int:
    """Enough tokens for one mask per object (and at least the server default), within ``limit``."""
    return min(limit, max(default, answer_tokens(num_objects)))


def build_segments(
    generation: Generation,
    width: int,
    height: int,
    objects: Sequence[str],
    special: SpecialIds,
    tokenizer: Any,
    decoder: MaskDecoder,
    *,
    polygons: bool = False,
) -> tuple[list[SegmentDetection], list[ParsedDetection], int]:
    """Response detections with masks, the parsed detections (bool ``mask`` arrays, for drawing), and how
    many detections were dropped for want of a label. CPU work: call it off the event loop."""
    parsed, dropped = labelled_detections(generation, width, height, objects, special, tokenizer)
    attach_masks(parsed, decoder, width, height)
    out = [
        SegmentDetection(
            **to_response(det).model_dump(),
            mask=None if det.mask is None else Mask.model_validate(mask_to_json(det.mask, polygons=polygons)),
        )
        for det in parsed
    ]
    return out, parsed, dropped
