"""Pure ASGI middleware: request ids + request metrics, and the body-size limit on bytes received.

Pure ASGI rather than ``BaseHTTPMiddleware`` so nothing buffers bodies or swallows cancellation.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import PayloadTooLarge, error_body
from service.metrics import Metrics, endpoint_label

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def request_id_of(scope: Scope) -> str | None:
    state = scope.get("state") or {}
    value = state.get("request_id")
    return value if isinstance(value, str) else None


class RequestContextMiddleware:
    """Gives each request an id (a sane client ``X-Request-ID`` is kept) and records count and latency."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        endpoint = endpoint_label(scope["path"])
        status = 500
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append("x-request-id", rid)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:
            status = 499  # client went away (nginx's convention)
            raise
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)


class BodyLimitMiddleware:
    """413 for a body over ``max_bytes``: at once from ``Content-Length``, else while counting chunks.

    Chunked uploads carry no length, and Starlette spools multipart files to disk with no total limit,
    so the bytes are counted as they arrive; the route's body read then raises :class:`PayloadTooLarge`.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.strip().isdigit():
                await self._reply(scope, send, 400, "bad_request", "Content-Length is not a valid length")
                return
            if int(length) > self.max_bytes:
                await self._reply(scope, send, 413, "too_large", self._message())
                return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise PayloadTooLarge(self._message())
            return message

        await self.app(scope, counting_receive, send)

    def _message(self) -> str:
        return f"the request body is larger than {self.max_bytes} bytes"

    async def _reply(self, scope: Scope, send: Send, status: int, code: str, message: str) -> None:
        body = json.dumps(error_body(code, message, request_id_of(scope), path=scope["path"], status=status)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
