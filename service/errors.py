"""Errors the service returns, each with a status, a stable code and a fixed public message.

Every error body is ``{"error": {"code": "...", "message": "...", "request_id": "..."}}`` (on the
OpenAI-compatible ``/v1/*`` routes, OpenAI's ``{"error": {"message", "type", "param", "code"}}``). Messages are
written here or by the prompt validator (which only echoes the user's own text); exception text from
Pillow, torch or the engine never reaches a client (Pillow's messages have leaked heap addresses before,
CVE-2026-22778) — details go to the log with the request id.

::

    ServiceError                 500 internal
    ├── BadRequest               400 bad_image, bad_base64, bad_json, bad_multipart, bad_field
    ├── PayloadTooLarge          413 too_large, image_too_large
    ├── UnsupportedMediaType     415 unsupported_media_type, unsupported_image_format
    ├── ValidationFailed         422 validation_error, bad_prompt
    ├── ModelNotFound            404 model_not_found (/v1/* only)
    ├── Unavailable              503 not_ready, overloaded, engine_unavailable
    ├── DeadlineExceeded         504 deadline_exceeded
    └── ClientClosedRequest      499 client_closed (logged only: nobody is left to read it)
"""

from __future__ import annotations

from typing import Any, ClassVar


class ServiceError(Exception):
    """Base: an error with an HTTP status, a code and a public message."""

    status: ClassVar[int] = 500
    default_code: ClassVar[str] = "internal"
    default_message: ClassVar[str] = "internal error"

    def __init__(self, message: str | None = None, *, code: str | None = None, param: str | None = None) -> None:
        self.code = code or self.default_code
        self.message = message or self.default_message
        self.param = param
        """The request field at fault, for the OpenAI error shape (``/v1/*``)."""
        super().__init__(self.message)

    def headers(self) -> dict[str, str]:
        """Extra response headers (``Retry-After`` for 503)."""
        return {}

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled whole (code and param too): image errors are raised in the upload worker processes."""
        return (_rebuild, (type(self), self.message, self.code, self.param))


def _rebuild(kind: type[ServiceError], message: str, code: str, param: str | None) -> ServiceError:
    return kind(message, code=code, param=param)


class BadRequest(ServiceError):
    """The body could not be read: bad image bytes, base64, JSON or multipart."""

    status = 400
    default_code = "bad_request"
    default_message = "the request could not be read"


class PayloadTooLarge(ServiceError):
    """More bytes or pixels than the configured limits."""

    status = 413
    default_code = "too_large"
    default_message = "the request body is too large"


class UnsupportedMediaType(ServiceError):
    """A body type other than multipart/JSON, or an image format outside the allow-list."""

    status = 415
    default_code = "unsupported_media_type"
    default_message = "send multipart/form-data or application/json"


class ValidationFailed(ServiceError):
    """Fields present but wrong: missing, wrong type, out of range, or text that cannot become a prompt."""

    status = 422
    default_code = "validation_error"
    default_message = "the request fields are not valid"


class Unavailable(ServiceError):
    """The engine is not loaded, is full, or has died; the client should retry later."""

    status = 503
    default_code = "not_ready"
    default_message = "the model is not ready"
    retry_after_s: ClassVar[int] = 1

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class DeadlineExceeded(ServiceError):
    """The request ran past its deadline; the engine request was aborted."""

    status = 504
    default_code = "deadline_exceeded"
    default_message = "the request did not finish before its deadline"


class ClientClosedRequest(ServiceError):
    """The client disconnected; the engine request was aborted (nginx's 499)."""

    status = 499
    default_code = "client_closed"
    default_message = "the client closed the connection"


class ModelNotFound(ServiceError):
    """``/v1/*``: the ``model`` field names neither the served model nor a loaded adapter."""

    status = 404
    default_code = "model_not_found"
    default_message = "the model does not exist"


OPENAI_PREFIX = "/v1/"
"""Routes under it speak OpenAI's API, errors included."""


def error_body(
    code: str, message: str, request_id: str | None, *, path: str = "", status: int = 400, param: str | None = None
) -> dict[str, dict[str, str | None]]:
    """The JSON error shape: ``{"error": {"code", "message", "request_id"}}``, or on ``/v1/*`` OpenAI's
    ``{"error": {"message", "type", "param", "code"}}`` (the request id is in the ``X-Request-ID`` header)."""
    if path.startswith(OPENAI_PREFIX):
        kind = "invalid_request_error" if status < 500 else "server_error"
        return {"error": {"message": message, "type": kind, "param": param, "code": code}}
    error: dict[str, str | None] = {"code": code, "message": message}
    if request_id:
        error["request_id"] = request_id
    return {"error": error}
