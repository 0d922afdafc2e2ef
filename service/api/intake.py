"""Request bodies -> validated fields + image bytes, then bytes -> the model's input in the upload workers.

Both body forms reach the same pydantic model: multipart (``image`` file part, other fields as text;
``objects`` may repeat) and JSON (``image`` as base64). Status choices, documented in docs/serving.md:
a body that cannot be read (bad JSON, base64, multipart) is 400; readable fields that are missing, of the
wrong type or out of range are 422; a body type other than the two is 415.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from service.deps import ServiceState
from service.errors import BadRequest, PayloadTooLarge, Unavailable, UnsupportedMediaType, ValidationFailed
from service.images import ImageLimits
from service.model_input import Upload

P = TypeVar("P", bound=BaseModel)

MAX_FIELDS = 16
MAX_FIELD_BYTES = 64 * 1024


def _validate(model: type[P], fields: dict[str, Any]) -> P:
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:5]]
        raise ValidationFailed("; ".join(problems)) from None


class _ImageParts(MultiPartParser):
    """Starlette's multipart parser, with each file part kept as the list of its chunks and joined once.
    Starlette's own way writes every ~64 KB chunk into a spooled temporary file: a growing in-memory buffer
    copied over and over, then, past 1 MB, a thread hop per chunk. For a phone photo that was milliseconds
    of the event loop, more than the rest of the request (issue 36). The body limit bounds what is kept."""

    def __init__(self, request: Request) -> None:
        super().__init__(
            request.headers, request.stream(), max_files=1, max_fields=MAX_FIELDS, max_part_size=MAX_FIELD_BYTES
        )
        self.chunks: dict[int, list[bytes]] = {}
        """File part data by ``id`` of its ``UploadFile`` (which stays empty)."""

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        file = self._current_part.file
        if file is None:  # a field: Starlette's own size limit applies
            super().on_part_data(data, start, end)
        else:
            self.chunks.setdefault(id(file), []).append(data[start:end])

    def file_bytes(self, file: UploadFile, limit: int) -> bytes:
        """The file part's bytes, or its first ``limit`` + 1 when it has more (enough to refuse it)."""
        chunks = self.chunks.get(id(file), [])
        if sum(len(chunk) for chunk in chunks) > limit:
            return b"".join(chunks)[: limit + 1]
        return b"".join(chunks)


async def _read_multipart(request: Request, max_image_bytes: int) -> tuple[dict[str, Any], bytes | None]:
    fields: dict[str, Any] = {}
    data: bytes | None = None
    parser = _ImageParts(request)
    try:
        form = await parser.parse()
    except MultiPartException as exc:  # Starlette's multipart parser errors: fixed texts of its own
        raise BadRequest(f"malformed multipart body: {exc.message}", code="bad_multipart") from None
    try:
        for key in dict.fromkeys(form.keys()):
            values = form.getlist(key)
            if key == "image":
                if not isinstance(values[0], UploadFile):
                    raise BadRequest("send the image as a file part named 'image'", code="bad_field")
                data = parser.file_bytes(values[0], max_image_bytes)
            elif any(isinstance(v, UploadFile) for v in values):
                raise BadRequest(f"only 'image' may be a file; {key!r} is one", code="bad_field")
            elif key == "objects":  # "cat ; dog", or one name per repeated field
                fields[key] = " ; ".join(str(v) for v in values)
            else:
                fields[key] = values[0] if len(values) == 1 else values
    finally:
        await form.close()
    return fields, data


async def _read_json(request: Request) -> tuple[dict[str, Any], str | None]:
    try:
        payload = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: [[[[... nesting bombs
        raise BadRequest("the body is not valid JSON", code="bad_json") from None
    if not isinstance(payload, dict):
        raise ValidationFailed("body: must be a JSON object")
    if "image_url" in payload:  # issue 6: no URL fetching (SSRF); the schema has no such field
        raise ValidationFailed("image_url: fetching images from URLs is disabled; send the image itself as base64")
    image = payload.pop("image", None)
    if image is not None and not isinstance(image, str):
        raise ValidationFailed("image: must be a base64 string")
    return payload, image  # base64 text: decoded in the upload worker (service.images.image_bytes)


async def read_request(request: Request, params_model: type[P], limits: ImageLimits) -> tuple[P, bytes | str]:
    """Validated fields and the image: bytes (multipart) or base64 text (JSON)."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    data: bytes | str | None
    if media == "multipart/form-data":
        fields, data = await _read_multipart(request, limits.max_bytes)
    elif media == "application/json":
        fields, data = await _read_json(request)
    else:
        raise UnsupportedMediaType()
    params = _validate(params_model, fields)
    if data is None:
        raise ValidationFailed("image: Field required")
    if isinstance(data, bytes) and len(data) > limits.max_bytes:
        raise PayloadTooLarge(f"image is larger than {limits.max_bytes} bytes", code="image_too_large")
    return params, data


async def decode(state: ServiceState, data: bytes | str) -> Upload:
    """The upload decoded and resized to the model's input in a worker process (:mod:`service.model_input`),
    never on the event loop or under this process's GIL. The decode time goes to the metrics."""
    if state.uploads is None:
        raise Unavailable()
    upload = await state.uploads.prepare(data)
    state.metrics.decode_seconds.observe(upload.seconds)
    return upload
