"""Admission control and drain state: a bounded number of inference requests, decided before the body is read.

``max_concurrent_requests`` requests are processed at once (body read, image decode, engine call); up to
``max_queued_requests`` more wait for a slot *before their body is read*; anything beyond gets
``503 overloaded`` with ``Retry-After`` at once, without reading or decoding a byte of the image (vLLM
#58192 checked its queue limit only after seconds of image processing). After SIGTERM (see
:mod:`service.guards.drain`) every new request gets ``503 draining`` while the admitted ones finish.

Probes, metrics, the docs and the page at ``/`` are exempt: a full server must still answer its probes.
The middleware is pure ASGI (no ``BaseHTTPMiddleware``) so nothing reads or buffers the body early.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from prometheus_client import Counter, Gauge
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_body
from service.metrics import Metrics
from service.settings import Settings

EXEMPT_PATHS = frozenset(
    {"/healthz", "/readyz", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
)
"""Never counted, never refused (``GET /`` and ``HEAD /``, the page, and its ``/examples`` are exempt too)."""

REJECT_REASONS = ("overloaded", "draining", "queue_timeout", "unauthorized")


def is_exempt(scope: Scope) -> bool:
    """Probes, metrics, docs and the page: open to everyone and outside the admission limit."""
    path = scope["path"]
    page = path == "/" or path == "/examples" or path.startswith("/examples/")
    return path in EXEMPT_PATHS or (page and scope["method"] in ("GET", "HEAD"))


class Rejected(Exception):
    """A request was refused before its body was read (503 with ``Retry-After``)."""

    def __init__(self, reason: str, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retry_after_s = retry_after_s


class Admission:
    """Counts admitted requests (running + waiting) and carries the drain flag.

    One per app. ``draining`` flips once (SIGTERM) and never back; :meth:`wait_idle` is how the drain waits.
    """

    def __init__(self, max_concurrent: int, max_queued: int, queue_timeout_s: float) -> None:
        self.max_concurrent = max_concurrent
        self.max_queued = max_queued
        self.queue_timeout_s = queue_timeout_s
        self.running = 0
        self.waiting = 0
        self.draining = False
        self._slots = asyncio.Semaphore(max_concurrent)
        self._idle = asyncio.Event()
        self._idle.set()

    @classmethod
    def from_settings(cls, settings: Settings) -> Admission:
        return cls(settings.max_concurrent_requests, settings.max_queued_requests, settings.request_timeout_s)

    @property
    def in_flight(self) -> int:
        """Admitted requests not finished yet: running plus waiting for a slot."""
        return self.running + self.waiting

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one processing slot for the body of the ``async with``, or raise :class:`Rejected`."""
        if self.draining:
            raise Rejected("draining", "the server is shutting down; retry on another replica", 5)
        if self.in_flight >= self.max_concurrent + self.max_queued:
            raise Rejected("overloaded", "the server is busy; retry later", 1)
        self.waiting += 1
        self._idle.clear()
        try:
            try:
                await asyncio.wait_for(self._slots.acquire(), self.queue_timeout_s)
            except TimeoutError:
                raise Rejected("queue_timeout", "no processing slot became free in time; retry later", 1) from None
            finally:
                self.waiting -= 1
            self.running += 1
            try:
                yield
            finally:
                self.running -= 1
                self._slots.release()
        finally:
            if self.in_flight == 0:
                self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no admitted request is left (True) or ``timeout_s`` passed (False)."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True


class AdmissionMetrics:
    """``paligemma_rejected_requests_total{reason}`` and ``paligemma_admitted_requests{state}``."""

    def __init__(self, metrics: Metrics, admission: Admission) -> None:
        r = metrics.registry
        self.rejected = Counter(
            "paligemma_rejected_requests",
            "Requests refused before their body was read, by reason (" + ", ".join(REJECT_REASONS) + ")",
            ["reason"],
            registry=r,
        )
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        admitted = Gauge(
            "paligemma_admitted_requests",
            "Admitted inference requests, by state (running, waiting)",
            ["state"],
            registry=r,
        )
        admitted.labels("running").set_function(lambda: admission.running)
        admitted.labels("waiting").set_function(lambda: admission.waiting)
        Gauge("paligemma_draining", "1 after SIGTERM while in-flight requests finish", registry=r).set_function(
            lambda: float(admission.draining)
        )


async def send_error(scope: Scope, send: Send, status: int, code: str, message: str, headers: dict[str, str]) -> None:
    """Send the service's JSON error shape straight from a middleware (no body read)."""
    state = scope.get("state") or {}
    request_id = state.get("request_id") if isinstance(state.get("request_id"), str) else None
    body = json.dumps(error_body(code, message, request_id, path=scope["path"], status=status)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class AdmissionMiddleware:
    """503 + ``Retry-After`` for requests beyond the limit or during the drain, before the body is read."""

    def __init__(self, app: ASGIApp, admission: Admission, metrics: AdmissionMetrics) -> None:
        self.app = app
        self.admission = admission
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_exempt(scope):
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            async with self.admission.slot():
                await self.app(scope, receive, tracking_send)
            return
        except Rejected as exc:
            rejected = exc
        except asyncio.CancelledError:
            if not self.admission.draining or started:
                raise
            # uvicorn cancels what is left after the drain and its grace; unanswered, it would send a bare 500
            message = "cut off by the shutdown's drain timeout; retry on another replica"
            await send_error(scope, send, 503, "draining", message, {"Retry-After": "5"})
            return
        self.metrics.rejected.labels(rejected.reason).inc()
        code = "draining" if rejected.reason == "draining" else "overloaded"
        await send_error(scope, send, 503, code, rejected.message, {"Retry-After": str(rejected.retry_after_s)})
