"""Make the OpenAPI document say exactly what *this* server accepts and answers (Schemathesis checks it).

FastAPI's schema is built from the pydantic models; a few facts only the running configuration knows,
or that the models express for JSON but not for multipart, are patched in once, on first request:

- multipart forms have no ``null``: optional fields are omitted, so ``anyOf [X, null]`` becomes ``X``;
- ``max_new_tokens`` gets ``maximum = max_new_tokens_limit``;
- ``adapter`` lists the adapters started with ``--lora`` (and is left out when there are none);
- inference routes describe ``X-Request-Timeout`` and document 504 (deadline), 503 (overloaded or draining) and,
  with ``api_keys``, 401 and the bearer security scheme.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from service.errors import OPENAI_PREFIX
from service.settings import Settings

_TIMEOUT_NOTE = (
    "\n\nAn `X-Request-Timeout: <seconds>` header shortens (never lengthens) the server's deadline; past it: 504. "
    "(Not a schema parameter: a fuzzer's 1e-300 s deadline would make every 504 look like a server fault.)"
)
_ERROR_REF = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
_OPENAI_ERROR_REF = {"application/json": {"schema": {"$ref": "#/components/schemas/OpenAIErrorResponse"}}}


def _without_null(prop: dict[str, Any]) -> dict[str, Any]:
    branches = [b for b in prop.get("anyOf", []) if b.get("type") != "null"]
    if "anyOf" not in prop or len(branches) != 1:
        return prop
    rest = {k: v for k, v in prop.items() if k not in ("anyOf", "default")}
    return {**rest, **branches[0]}


def _fix_fields(schema: dict[str, Any], settings: Settings, multipart: bool) -> None:
    props: dict[str, Any] = schema.get("properties", {})
    if multipart:
        for name, prop in list(props.items()):
            props[name] = _without_null(prop)
    if "max_new_tokens" in props:
        prop = props["max_new_tokens"]
        for branch in [prop, *prop.get("anyOf", [])]:
            if branch.get("type") == "integer":
                branch["maximum"] = settings.max_new_tokens_limit
    if "adapter" in props:
        names = sorted(settings.loras)
        if not names:
            del props["adapter"]
        elif multipart:
            props["adapter"] = {"type": "string", "enum": names, "description": props["adapter"].get("description")}
        else:
            props["adapter"]["anyOf"] = [{"type": "string", "enum": names}, {"type": "null"}]


def _fix_operation(operation: dict[str, Any], settings: Settings, openai: bool) -> None:
    """An inference route (``openai``: one of ``/v1/*``, whose errors have OpenAI's shape)."""
    for media, body in operation.get("requestBody", {}).get("content", {}).items():
        _fix_fields(body["schema"], settings, multipart=media == "multipart/form-data")
    operation["description"] = operation.get("description", "") + _TIMEOUT_NOTE
    responses, ref = operation["responses"], _OPENAI_ERROR_REF if openai else _ERROR_REF
    responses["503"] = {"description": "Model not ready, overloaded (Retry-After) or draining", "content": ref}
    responses["504"] = {"description": "Past the deadline; the engine request was aborted", "content": ref}
    if settings.api_keys:
        responses["401"] = {"description": "Missing or invalid API key", "content": ref}
        operation["security"] = [{"bearer": []}]


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """Wrap ``app.openapi`` so the first call patches the generated document (then it is cached)."""
    generate = app.openapi
    done = False

    def openapi() -> dict[str, Any]:
        nonlocal done
        schema = generate()
        if not done:
            for path, item in schema.get("paths", {}).items():
                openai = path.startswith(OPENAI_PREFIX)
                for operation in (item.get("post"), item.get("get") if openai else None):
                    if operation is not None and ("requestBody" in operation or openai):
                        _fix_operation(operation, settings, openai)
            if settings.api_keys:
                schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
                schemes["bearer"] = {"type": "http", "scheme": "bearer"}
            done = True
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
