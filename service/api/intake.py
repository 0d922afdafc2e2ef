"""Request bodies -> validated fields + image bytes, then bytes -> image in the decode pool.

Both body forms reach the same pydantic model: multipart (``image`` file part, other fields as text;
``objects`` may repeat) and JSON (``image`` as base64). Status choices, documented in docs/serving.md:
a body that cannot be read (bad JSON, base64, multipart) is 400; readable fields that are missing, of the
wrong type or out of range are 422; a body type other than the two is 415.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import time
from typing import Any, TypeVar

from fastapi import Request
from PIL.Image import Image
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from service.deps import ServiceState
from service.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType, ValidationFailed
from service.images import ImageLimits, decode_image

P = TypeVar("P", bound=BaseModel)

MAX_FIELDS = 16
MAX_FIELD_BYTES = 64 * 1024


def _validate(model: type[P], fields: dict[str, Any]) -> P:
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:5]]
        raise ValidationFailed("; ".join(problems)) from None


async def _read_multipart(request: Request, max_image_bytes: int) -> tuple[dict[str, Any], bytes | None]:
    fields: dict[str, Any] = {}
    data: bytes | None = None
    try:
        async with request.form(max_files=1, max_fields=MAX_FIELDS, max_part_size=MAX_FIELD_BYTES) as form:
            for key in dict.fromkeys(form.keys()):
                values = form.getlist(key)
                if key == "image":
                    if not isinstance(values[0], UploadFile):
                        raise BadRequest("send the image as a file part named 'image'", code="bad_field")
                    data = await values[0].read(max_image_bytes + 1)
                elif any(isinstance(v, UploadFile) for v in values):
                    raise BadRequest(f"only 'image' may be a file; {key!r} is one", code="bad_field")
                elif key == "objects":  # "cat ; dog", or one name per repeated field
                    fields[key] = " ; ".join(str(v) for v in values)
                else:
                    fields[key] = values[0] if len(values) == 1 else values
    except HTTPException as exc:  # Starlette's multipart parser errors: fixed texts of its own
        raise BadRequest(f"malformed multipart body: {exc.detail}", code="bad_multipart") from None
    return fields, data


def decode_base64_image(text: object, max_image_bytes: int) -> bytes:
    """Image bytes from base64 (a ``data:`` URL prefix and line breaks allowed), within the size limit."""
    if not isinstance(text, str):
        raise ValidationFailed("image: must be a base64 string")
    if text.startswith("data:"):  # data:image/png;base64,....
        text = text.partition(",")[2]
    compact = "".join(text.split())  # MIME-style line breaks are fine
    if len(compact) > 4 * ((max_image_bytes + 2) // 3):
        raise PayloadTooLarge(f"image is larger than {max_image_bytes} bytes", code="image_too_large")
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("image is not valid base64", code="bad_base64") from None


async def _read_json(request: Request, max_image_bytes: int) -> tuple[dict[str, Any], bytes | None]:
    try:
        payload = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: [[[[... nesting bombs
        raise BadRequest("the body is not valid JSON", code="bad_json") from None
    if not isinstance(payload, dict):
        raise ValidationFailed("body: must be a JSON object")
    if "image_url" in payload:  # issue 6: no URL fetching (SSRF); the schema has no such field
        raise ValidationFailed("image_url: fetching images from URLs is disabled; send the image itself as base64")
    image = payload.pop("image", None)
    return payload, None if image is None else decode_base64_image(image, max_image_bytes)


async def read_request(request: Request, params_model: type[P], limits: ImageLimits) -> tuple[P, bytes]:
    """Validated fields and the raw image bytes of a multipart or JSON request."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media == "multipart/form-data":
        fields, data = await _read_multipart(request, limits.max_bytes)
    elif media == "application/json":
        fields, data = await _read_json(request, limits.max_bytes)
    else:
        raise UnsupportedMediaType()
    params = _validate(params_model, fields)
    if data is None:
        raise ValidationFailed("image: Field required")
    if len(data) > limits.max_bytes:
        raise PayloadTooLarge(f"image is larger than {limits.max_bytes} bytes", code="image_too_large")
    return params, data


def _timed_decode(data: bytes, limits: ImageLimits) -> tuple[Image, str, float]:
    start = time.perf_counter()
    image = decode_image(data, limits)
    seconds = time.perf_counter() - start  # the decode alone, as the metric says
    return image, hashlib.sha256(data).hexdigest(), seconds


async def decode(state: ServiceState, data: bytes) -> tuple[Image, str]:
    """The image and a digest of its bytes, made in the app's bounded thread pool (never on the event loop).

    The same bytes always decode to the same image, so the digest names it: vLLM keys its image-processing
    cache by it instead of hashing the decoded pixels in the API process (a 12-megapixel photo is 36 MB of
    pixels, its JPEG a few MB). The decode time goes to the metrics.
    """
    loop = asyncio.get_running_loop()
    image, digest, seconds = await loop.run_in_executor(state.decode_pool, _timed_decode, data, state.limits)
    state.metrics.decode_seconds.observe(seconds)
    return image, digest
