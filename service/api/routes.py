"""HTTP routes: ``/detect``, ``/vqa``, ``/caption``, ``/ocr`` and the probes ``/healthz``, ``/readyz``, ``/metrics``.

Each inference handler is the same four steps: read and validate the fields (cheap, before any decoding),
build the prefix with :mod:`paligemma.prompts`, decode the image in the pool, call the engine through
``EngineDep``. Handlers hold no model code; engines hold no HTTP code. The helpers without a leading
underscore (``ERROR_RESPONSES``, ``body_docs``, ``decode_and_generate``, ``usage_of``, ``elapsed_ms``) are
shared with :mod:`service.api.segment_routes`.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from paligemma import prompts, score_from_logprobs
from paligemma.grammar import GrammarSpec
from service.api.annotate import ANNOTATED, PNG_RESPONSE, annotated_png, from_response
from service.api.detections import build_detections
from service.api.intake import decode, read_request
from service.api.schemas import (
    OCRJSON,
    VQAJSON,
    CaptionJSON,
    CaptionParams,
    DetectJSON,
    DetectParams,
    DetectResponse,
    ErrorResponse,
    ImageInfo,
    OCRParams,
    Status,
    TextResponse,
    Usage,
    VQAParams,
    VQAResponse,
)
from service.deps import EngineDep, ServiceState, StateDep
from service.engines.protocol import Engine, Generation, GenerationRequest
from service.errors import ClientClosedRequest, DeadlineExceeded, Unavailable, ValidationFailed
from service.guards.cancellation import run_guarded
from service.guards.middleware import request_id_of
from service.model_input import Upload

router = APIRouter()
TIMEOUT_HEADER = "X-Request-Timeout"
GRAMMAR_CACHE_SIZE = 1024

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in (
        (400, "Unreadable body or image"),
        (413, "Body or image too large"),
        (415, "Not multipart/JSON, or an image format outside JPEG/PNG/WEBP/GIF/BMP"),
        (422, "Missing or invalid fields"),
        (503, "Model not ready, overloaded or unavailable"),
    )
}


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema with its ``$defs`` written in place: a body schema embedded in the OpenAPI
    document cannot point at ``#/$defs/...``, which resolves against the document's root (request models
    are not recursive, so this ends)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def expand(node: Any) -> Any:
        if isinstance(node, list):
            return [expand(item) for item in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            rest = {key: value for key, value in node.items() if key != "$ref"}
            return expand({**defs[ref.removeprefix("#/$defs/")], **rest})
        return {key: expand(value) for key, value in node.items()}

    return dict(expand(schema))


def body_docs(params: type[BaseModel], json_model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI request body for both content types (the handlers parse the body themselves)."""
    form = inline_schema(params)
    form["properties"] = {
        "image": {"type": "string", "format": "binary", "contentMediaType": "application/octet-stream"},
        **form["properties"],
    }
    form["required"] = ["image", *form.get("required", [])]
    content = {"multipart/form-data": {"schema": form}, "application/json": {"schema": inline_schema(json_model)}}
    return {"requestBody": {"required": True, "content": content}}


def _max_new_tokens(state: ServiceState, requested: int | None, default: int | None = None) -> int:
    """The request's ``max_new_tokens`` (checked against the limit), else ``default`` or the server's."""
    limit = state.settings.max_new_tokens_limit
    if requested is not None and requested > limit:
        raise ValidationFailed(f"max_new_tokens: may be at most {limit}")
    return requested or default or state.settings.max_new_tokens


async def _generate(request: Request, state: ServiceState, engine: Engine, job: GenerationRequest) -> Generation:
    """The engine call, aborted on client disconnect (499) or past the deadline (504)."""
    try:
        generation = await run_guarded(request, engine.generate(job), _deadline_s(request, state))
    except (DeadlineExceeded, ClientClosedRequest) as exc:
        state.metrics.aborted.labels(exc.code).inc()
        raise
    endpoint = request.url.path
    state.metrics.generated_tokens.labels(endpoint).inc(generation.completion_tokens)
    state.metrics.prompt_tokens.labels(endpoint).inc(generation.prompt_tokens)
    return generation


def _deadline_s(request: Request, state: ServiceState) -> float:
    """``request_timeout_s``, shortened (never lengthened) by an ``X-Request-Timeout: <seconds>`` header."""
    limit = state.settings.request_timeout_s
    header = request.headers.get(TIMEOUT_HEADER)
    if header is None:
        return limit
    try:
        asked = float(header)
    except ValueError:
        raise ValidationFailed(f"{TIMEOUT_HEADER}: must be a number of seconds") from None
    if not 0 < asked < float("inf"):
        raise ValidationFailed(f"{TIMEOUT_HEADER}: must be a positive number of seconds")
    return min(asked, limit)


async def decode_and_generate(
    request: Request,
    state: ServiceState,
    engine: Engine,
    prefix: str,
    params: Any,
    data: bytes | str,
    default_max_new_tokens: int | None = None,
    labels: list[str] | None = None,
    segment: bool = False,
) -> tuple[Upload, Generation]:
    """The shared middle of every handler: check ``max_new_tokens``, decode the image, run the engine.

    With ``labels`` (``/detect``, ``/segment``) and ``params.constrained``, the answer is decoded with the
    detection grammar over those labels.
    """
    max_new_tokens = _max_new_tokens(state, params.max_new_tokens, default_max_new_tokens)
    grammar = None
    if labels is not None and params.constrained:
        grammar = detection_grammar(state, engine, labels, segment, params.max_objects, max_new_tokens)
    upload = await decode(state, data)
    job = GenerationRequest(
        image=upload.image,
        image_id=upload.digest,
        prefix=prefix,
        max_new_tokens=max_new_tokens,
        adapter=params.adapter,
        request_id=request_id_of(request.scope) or "",
        grammar=grammar,
    )
    return upload, await _generate(request, state, engine, job)


def detection_grammar(
    state: ServiceState, engine: Engine, labels: list[str], segment: bool, max_objects: int, max_tokens: int
) -> GrammarSpec:
    """The grammar of a ``detect``/``segment`` answer over ``labels``, in the engine's token ids.

    Cached per app: building one tokenizes every label twice on the event loop (a fifth of a ``/detect``
    request's work there, measured under load), and clients ask for the same few label sets over and over.
    """
    if state.special_ids is None:
        raise Unavailable()
    key = (tuple(labels), segment, max_objects, max_tokens)
    spec = state.grammar_specs.get(key)
    if spec is None:
        tokenizer: Any = engine.tokenizer()
        try:
            spec = GrammarSpec.build(
                tokenizer,
                state.special_ids,
                int(tokenizer.eos_token_id),
                labels,
                segment=segment,
                max_objects=max_objects,
                max_tokens=max_tokens,
            )
        except ValueError as exc:
            raise ValidationFailed(f"objects: {exc}") from None
        if len(state.grammar_specs) >= GRAMMAR_CACHE_SIZE:
            state.grammar_specs.clear()
        state.grammar_specs[key] = spec
    return spec


def usage_of(generation: Generation) -> Usage:
    return Usage(prompt_tokens=generation.prompt_tokens, completion_tokens=generation.completion_tokens)


def elapsed_ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 1)


@router.post(
    "/detect",
    response_model=DetectResponse,
    responses={**ERROR_RESPONSES, **PNG_RESPONSE},
    openapi_extra=body_docs(DetectParams, DetectJSON),
    summary="Boxes for the named objects",
    tags=["inference"],
)
async def detect(
    request: Request, state: StateDep, engine: EngineDep, annotated: bool = ANNOTATED
) -> DetectResponse | Response:
    """Detect objects; boxes in pixels of the uploaded image after EXIF rotation (x right, y down).

    With ``?annotated=true`` the answer is the image with the boxes drawn (PNG) instead of JSON.
    """
    start = time.perf_counter()
    params, data = await read_request(request, DetectParams, state.limits)
    objects = prompts.split_objects(params.objects)
    prefix = prompts.detect(objects)
    upload, generation = await decode_and_generate(request, state, engine, prefix, params, data, labels=objects)
    if state.special_ids is None:
        raise Unavailable()
    detections, dropped = build_detections(
        generation, upload.width, upload.height, objects, state.special_ids, engine.tokenizer()
    )
    state.metrics.detections.observe(len(detections))
    state.metrics.detections_dropped.labels("no_label").inc(dropped)
    if annotated:
        return await annotated_png(data, state.limits, from_response(detections))
    return DetectResponse(
        detections=detections,
        image=ImageInfo(width=upload.width, height=upload.height),
        model=engine.model_name,
        text=generation.text,
        usage=usage_of(generation),
        latency_ms=elapsed_ms(start),
    )


@router.post(
    "/vqa",
    response_model=VQAResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=body_docs(VQAParams, VQAJSON),
    summary="Answer a question about the image",
    tags=["inference"],
)
async def vqa(request: Request, state: StateDep, engine: EngineDep) -> VQAResponse:
    """Short answer to ``question``; ``score`` is the geometric mean of the answer tokens' probabilities."""
    start = time.perf_counter()
    params, data = await read_request(request, VQAParams, state.limits)
    prefix = prompts.answer(params.question, params.lang)
    _, generation = await decode_and_generate(request, state, engine, prefix, params, data)
    return VQAResponse(
        answer=generation.text.strip(),
        score=score_from_logprobs(generation.logprobs),
        model=engine.model_name,
        text=generation.text,
        usage=usage_of(generation),
        latency_ms=elapsed_ms(start),
    )


async def _text_task(
    request: Request, state: ServiceState, engine: Engine, prefix: str, params: Any, data: bytes | str
) -> TextResponse:
    start = time.perf_counter()
    _, generation = await decode_and_generate(request, state, engine, prefix, params, data)
    return TextResponse(
        text=generation.text.strip(),
        score=score_from_logprobs(generation.logprobs),
        model=engine.model_name,
        usage=usage_of(generation),
        latency_ms=elapsed_ms(start),
    )


@router.post(
    "/caption",
    response_model=TextResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=body_docs(CaptionParams, CaptionJSON),
    summary="Caption the image",
    tags=["inference"],
)
async def caption(request: Request, state: StateDep, engine: EngineDep) -> TextResponse:
    """``detail=short`` uses the ``caption {lang}`` prefix, ``long`` uses ``describe {lang}``."""
    params, data = await read_request(request, CaptionParams, state.limits)
    prefix = prompts.caption(params.lang) if params.detail == "short" else prompts.describe(params.lang)
    return await _text_task(request, state, engine, prefix, params, data)


@router.post(
    "/ocr",
    response_model=TextResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=body_docs(OCRParams, OCRJSON),
    summary="Read the text in the image",
    tags=["inference"],
)
async def ocr(request: Request, state: StateDep, engine: EngineDep) -> TextResponse:
    params, data = await read_request(request, OCRParams, state.limits)
    return await _text_task(request, state, engine, prompts.ocr(), params, data)


@router.get("/healthz", response_model=Status, tags=["probes"])
async def healthz() -> Status:
    """The process is alive and serving HTTP."""
    return Status(status="ok")


@router.get("/readyz", response_model=Status, responses={503: {"model": ErrorResponse}}, tags=["probes"])
async def readyz(state: StateDep, engine: EngineDep) -> Status:
    """The engine is loaded and healthy, and the server is not draining: send traffic."""
    if state.admission.draining:
        raise Unavailable("the server is shutting down", code="draining")
    await engine.check_health()
    return Status(status="ready", model=engine.model_name, engine=engine.name)


@router.get("/metrics", tags=["probes"], response_class=Response)
async def metrics(state: StateDep) -> Response:
    """Prometheus text format: this app's ``paligemma_*`` metrics and prometheus_client's default registry."""
    return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
