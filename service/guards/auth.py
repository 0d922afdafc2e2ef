"""Optional bearer-key auth (``api_keys``), checked before admission and before the body is read.

With no keys configured everything is open. With keys, every route except the probes, ``/metrics``, the
docs and the page (:func:`service.guards.admission.is_exempt`) needs ``Authorization: Bearer <key>``; anything
else gets ``401`` with ``WWW-Authenticate: Bearer``. The presented key is compared against *every*
configured key with :func:`hmac.compare_digest` over SHA-256 digests (equal lengths, no early exit), so
the time taken does not depend on which key matched or how much of a key was right. Keys never reach
logs or responses.
"""

from __future__ import annotations

import hashlib
import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from service.guards.admission import AdmissionMetrics, is_exempt, send_error


def _digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode("utf-8") if isinstance(key, str) else key).digest()


class KeyRing:
    """The configured keys, kept only as SHA-256 digests."""

    def __init__(self, keys: list[str]) -> None:
        self._digests = [_digest(k) for k in keys]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def accepts(self, presented: bytes) -> bool:
        """True when ``presented`` equals one of the keys; always compares against all of them."""
        candidate = _digest(presented)
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(candidate, digest)
        return matched


def bearer_token(scope: Scope) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` header (scheme case-insensitive), else None."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            token = token.strip()
            return token if scheme.lower() == b"bearer" and token else None
    return None


class AuthMiddleware:
    """401 for non-exempt requests without a valid bearer key (only installed when keys are configured)."""

    def __init__(self, app: ASGIApp, keys: KeyRing, metrics: AdmissionMetrics) -> None:
        self.app = app
        self.keys = keys
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_exempt(scope):
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope)
        if token is not None and self.keys.accepts(token):
            await self.app(scope, receive, send)
            return
        self.metrics.rejected.labels("unauthorized").inc()
        message = "send a valid API key as 'Authorization: Bearer <key>'"
        challenge = 'Bearer realm="paligemma"' + ("" if token is None else ', error="invalid_token"')
        await send_error(scope, send, 401, "unauthorized", message, {"WWW-Authenticate": challenge})
