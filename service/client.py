"""Python client for the service, on httpx: :class:`Client` (sync) and :class:`AsyncClient`.

Results are the service's own response models (``DetectResponse``, ``VQAResponse``, ``TextResponse``);
error responses raise :class:`ServiceHTTPError` carrying the error ``code``. Images may be a path, raw
file bytes, or a ``PIL.Image`` (sent as PNG)::

    with Client("http://127.0.0.1:8000") as client:
        result = client.detect("street.jpg", ["car", "person"])
        for det in result.detections:
            print(det.label, det.box, det.score)
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

import httpx
from PIL import Image
from pydantic import BaseModel

from service.api.schemas import DetectResponse, TextResponse, VQAResponse

ImageInput = str | os.PathLike[str] | bytes | Image.Image
T = TypeVar("T", bound=BaseModel)
DEFAULT_URL = "http://127.0.0.1:8000"


class ServiceHTTPError(Exception):
    """The service answered with an error body."""

    def __init__(self, status: int, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.request_id = status, code, message, request_id


@dataclass(frozen=True)
class _Call:
    path: str
    files: dict[str, tuple[str, bytes, str]]
    data: dict[str, str | list[str]]


def _image_bytes(image: ImageInput) -> bytes:
    if isinstance(image, bytes):
        return image
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    return Path(image).read_bytes()


def _call(path: str, image: ImageInput, **fields: Any) -> _Call:
    data: dict[str, str | list[str]] = {}
    for key, value in fields.items():
        if value is not None:
            data[key] = [str(v) for v in value] if isinstance(value, list | tuple) else str(value)
    return _Call(path, {"image": ("image", _image_bytes(image), "application/octet-stream")}, data)


def _parse(response: httpx.Response, model: type[T]) -> T:
    if response.status_code >= 400:
        try:
            error = response.json()["error"]
            raise ServiceHTTPError(response.status_code, error["code"], error["message"], error.get("request_id"))
        except (ValueError, KeyError, TypeError):
            raise ServiceHTTPError(response.status_code, "http_error", response.text[:200]) from None
    return model.model_validate(response.json())


def _objects(objects: str | list[str] | tuple[str, ...]) -> list[str]:
    return [objects] if isinstance(objects, str) else list(objects)


def _detect_call(
    image: ImageInput, objects: str | list[str] | tuple[str, ...], max_new_tokens: int | None, constrained: bool
) -> _Call:
    fields = {"objects": _objects(objects), "max_new_tokens": max_new_tokens, "constrained": str(constrained).lower()}
    return _call("/detect", image, **fields)


class Client:
    """Blocking client; pass ``http`` to reuse your own ``httpx.Client`` (its base URL is used)."""

    def __init__(self, base_url: str = DEFAULT_URL, *, timeout: float = 120.0, http: httpx.Client | None = None):
        self._http = http or httpx.Client(base_url=base_url, timeout=timeout)

    def _post(self, call: _Call, model: type[T]) -> T:
        return _parse(self._http.post(call.path, files=call.files, data=call.data), model)

    def detect(
        self,
        image: ImageInput,
        objects: str | list[str] | tuple[str, ...],
        *,
        max_new_tokens: int | None = None,
        constrained: bool = True,
    ) -> DetectResponse:
        """Boxes for ``objects`` (``"cat ; dog"`` or ``["cat", "dog"]``); ``constrained=False`` lets the model
        write freely instead of following the detection grammar."""
        call = _detect_call(image, objects, max_new_tokens, constrained)
        return self._post(call, DetectResponse)

    def vqa(
        self, image: ImageInput, question: str, *, lang: str = "en", max_new_tokens: int | None = None
    ) -> VQAResponse:
        call = _call("/vqa", image, question=question, lang=lang, max_new_tokens=max_new_tokens)
        return self._post(call, VQAResponse)

    def caption(
        self,
        image: ImageInput,
        *,
        lang: str = "en",
        detail: Literal["short", "long"] = "short",
        max_new_tokens: int | None = None,
    ) -> TextResponse:
        call = _call("/caption", image, lang=lang, detail=detail, max_new_tokens=max_new_tokens)
        return self._post(call, TextResponse)

    def ocr(self, image: ImageInput, *, max_new_tokens: int | None = None) -> TextResponse:
        return self._post(_call("/ocr", image, max_new_tokens=max_new_tokens), TextResponse)

    def ready(self) -> bool:
        """True when ``/readyz`` answers 200."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """The same calls for asyncio; pass ``http`` to reuse your own ``httpx.AsyncClient``."""

    def __init__(
        self, base_url: str = DEFAULT_URL, *, timeout: float = 120.0, http: httpx.AsyncClient | None = None
    ) -> None:
        self._http = http or httpx.AsyncClient(base_url=base_url, timeout=timeout)

    async def _post(self, call: _Call, model: type[T]) -> T:
        return _parse(await self._http.post(call.path, files=call.files, data=call.data), model)

    async def detect(
        self,
        image: ImageInput,
        objects: str | list[str] | tuple[str, ...],
        *,
        max_new_tokens: int | None = None,
        constrained: bool = True,
    ) -> DetectResponse:
        call = _detect_call(image, objects, max_new_tokens, constrained)
        return await self._post(call, DetectResponse)

    async def vqa(
        self, image: ImageInput, question: str, *, lang: str = "en", max_new_tokens: int | None = None
    ) -> VQAResponse:
        call = _call("/vqa", image, question=question, lang=lang, max_new_tokens=max_new_tokens)
        return await self._post(call, VQAResponse)

    async def caption(
        self,
        image: ImageInput,
        *,
        lang: str = "en",
        detail: Literal["short", "long"] = "short",
        max_new_tokens: int | None = None,
    ) -> TextResponse:
        call = _call("/caption", image, lang=lang, detail=detail, max_new_tokens=max_new_tokens)
        return await self._post(call, TextResponse)

    async def ocr(self, image: ImageInput, *, max_new_tokens: int | None = None) -> TextResponse:
        return await self._post(_call("/ocr", image, max_new_tokens=max_new_tokens), TextResponse)

    async def ready(self) -> bool:
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.TransportError:
            return False

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
