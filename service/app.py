"""The app factory: ``create_app(settings, engine_factory=None) -> FastAPI``.

Nothing happens at import: the engine is opened in the lifespan (and closed in its ``finally``), metrics
live in a registry owned by this app, and every error leaves as ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from paligemma import PromptError, SpecialIds
from service.api.openai_routes import router as openai_router
from service.api.openapi import install_openapi
from service.api.page_routes import router as page_router
from service.api.routes import router
from service.api.segment_routes import router as segment_router
from service.api.segments import load_mask_decoder
from service.deps import ServiceState
from service.engines import open_engine
from service.engines.protocol import Engine, EngineDeadError, EngineError, EngineOverloadedError, UnknownAdapterError
from service.errors import ServiceError, error_body
from service.guards.admission import Admission, AdmissionMetrics, AdmissionMiddleware
from service.guards.auth import AuthMiddleware, KeyRing
from service.guards.middleware import BodyLimitMiddleware, RequestContextMiddleware, request_id_of
from service.images import ImageLimits
from service.metrics import Metrics
from service.model_input import UploadPool, load_resize
from service.settings import Settings

log = logging.getLogger(__name__)

EngineFactory = Callable[[Settings], AbstractAsyncContextManager[Engine]]

WATCHDOG_INTERVAL_S = 1.0
HARD_EXIT_AFTER_S = 15.0
_HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}


async def _watch_engine(state: ServiceState, engine: Engine) -> None:
    """Poll the engine's health; when it dies, exit non-zero so docker/kubernetes restart the process.

    ``/readyz`` already answers 503 from the same health check. ``python -m service`` sets
    ``state.request_exit`` (uvicorn's graceful stop, then it exits with ``state.exit_code``); a hard exit
    is the backstop in case shutdown hangs on the dead engine. Apps embedded in tests only turn unready.
    """
    while True:
        await asyncio.sleep(WATCHDOG_INTERVAL_S)
        try:
            await engine.check_health()
        except EngineDeadError:
            log.critical("the %s engine died; the process exits so its supervisor can restart it", engine.name)
            state.exit_code = 1
            if state.request_exit is not None:
                threading.Timer(HARD_EXIT_AFTER_S, os._exit, args=(1,)).start()
                state.request_exit()
            return


def _freeze_startup_heap() -> None:
    """Move what startup allocated (the model, tokenizer, libraries) out of the garbage collector's reach.

    A full collection otherwise walks all of it while requests wait on the event loop: 20-240 ms a collection
    in the demo model's server process on the 2-core dev machine. vLLM's own server freezes its heap after
    start-up in the same way (``vllm.utils.gc_utils.freeze_gc_heap``).
    """
    gc.collect()
    gc.freeze()


def _lifespan(state: ServiceState, factory: EngineFactory) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            state.mask_decoder = await load_mask_decoder(state.settings)  # /segment; None when not configured
            async with factory(state.settings) as engine:
                # Started now: the vLLM engine settles every child process onto the model's cores as it starts.
                state.uploads = await _start_uploads(state)
                state.special_ids = SpecialIds.from_tokenizer(engine.tokenizer())  # type: ignore[arg-type]
                state.grammar_specs.clear()
                state.metrics.watch_engine(engine.stats)
                state.metrics.model_info.labels(engine.model_name, engine.name).set(1)
                state.engine = engine
                log.info("serving %s with the %s engine", engine.model_name, engine.name)
                watchdog = asyncio.create_task(_watch_engine(state, engine), name="engine-watchdog")
                _freeze_startup_heap()
                try:
                    yield
                finally:
                    gc.unfreeze()
                    watchdog.cancel()
                    state.engine = None
                    state.metrics.unwatch_engine()
        finally:
            if state.uploads is not None:
                state.uploads.shutdown()
                state.uploads = None

    return lifespan


async def _start_uploads(state: ServiceState) -> UploadPool:
    """The upload workers, resizing to the input size of the model's processor (when reproduced)."""
    import torch

    from service.engines.cpu_threads import decode_workers

    settings = state.settings
    resize = await asyncio.to_thread(load_resize, settings.model)
    workers = decode_workers(settings, on_gpu=torch.cuda.is_available() and settings.device != "cpu")
    pool = UploadPool(workers, state.limits, resize, draft=settings.jpeg_draft)
    await pool.start()
    log.info(
        "%d upload worker processes%s%s",
        workers,
        f"; uploads resized to {resize.width}x{resize.height} ({resize.interpolation}) as the processor does"
        if resize
        else "; the processor's resize is not one reproduced here: engines get whole images",
        "; JPEG draft decoding on" if settings.jpeg_draft else "",
    )
    return pool


def _reply(
    request: Request,
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    param: str | None = None,
) -> JSONResponse:
    body = error_body(code, message, request_id_of(request.scope), path=request.url.path, status=status, param=param)
    return JSONResponse(body, status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    """Map every exception to the JSON error shape; only fixed or validator-written messages go out."""

    async def service_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)
        return _reply(request, exc.status, exc.code, exc.message, exc.headers(), exc.param)

    async def prompt_error(request: Request, exc: Exception) -> JSONResponse:
        return _reply(request, 422, "bad_prompt", str(exc))  # PromptError texts are written for users

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problems = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5]]
        return _reply(request, 422, "validation_error", "; ".join(problems))

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        message = exc.detail if exc.status_code < 500 and isinstance(exc.detail, str) else "internal error"
        return _reply(
            request, exc.status_code, _HTTP_CODES.get(exc.status_code, "error"), message, dict(exc.headers or {})
        )

    async def overloaded(request: Request, exc: Exception) -> JSONResponse:
        return _reply(request, 503, "overloaded", "the server is busy; retry later", {"Retry-After": "1"})

    async def engine_dead(request: Request, exc: Exception) -> JSONResponse:
        log.error("engine unavailable (request %s): %s", request_id_of(request.scope), exc)
        return _reply(request, 503, "engine_unavailable", "the model is unavailable", {"Retry-After": "5"})

    async def unknown_adapter(request: Request, exc: Exception) -> JSONResponse:
        return _reply(request, 400, "unknown_adapter", "the requested adapter is not loaded")

    async def engine_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("engine error (request %s): %s", request_id_of(request.scope), exc)
        return _reply(request, 500, "engine_error", "the model failed on this request")

    async def client_gone(request: Request, exc: Exception) -> JSONResponse:  # mid-body disconnect: not a 500
        return _reply(request, 499, "client_closed", "the client closed the connection")

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error (request %s)", request_id_of(request.scope), exc_info=exc)
        return _reply(request, 500, "internal", "internal error")

    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(PromptError, prompt_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(EngineOverloadedError, overloaded)
    app.add_exception_handler(EngineDeadError, engine_dead)
    app.add_exception_handler(UnknownAdapterError, unknown_adapter)
    app.add_exception_handler(EngineError, engine_error)
    app.add_exception_handler(ClientDisconnect, client_gone)
    app.add_exception_handler(Exception, unexpected)


def create_app(settings: Settings, engine_factory: EngineFactory | None = None) -> FastAPI:
    """A fresh app; ``engine_factory`` defaults to :func:`service.engines.open_engine`."""
    metrics = Metrics()
    limits = ImageLimits(settings.max_image_bytes, settings.max_image_pixels, settings.max_aspect_ratio)
    state = ServiceState(settings=settings, metrics=metrics, limits=limits, admission=Admission.from_settings(settings))
    factory = engine_factory or partial(open_engine, on_batch=metrics.batch_size.observe)
    app = FastAPI(
        title="PaliGemma service",
        summary="Detection, VQA, captions and OCR with PaliGemma over HTTP",
        description="Send the image as a multipart file part `image`, or as base64 in a JSON body. "
        'Errors are `{"error": {"code", "message", "request_id"}}`.',
        version="0.1.0",
        lifespan=_lifespan(state, factory),
    )
    app.state.service = state
    app.include_router(router)
    app.include_router(segment_router)  # /segment
    app.include_router(page_router)  # the page at / and its /examples
    app.include_router(openai_router)  # /v1/models, /v1/chat/completions
    _install_error_handlers(app)
    install_openapi(app, settings)  # the schema as this configuration serves it (issue 6, schemathesis)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    admission_metrics = AdmissionMetrics(metrics, state.admission)  # issue 6: before any body is read
    app.add_middleware(AdmissionMiddleware, admission=state.admission, metrics=admission_metrics)
    if settings.api_keys:  # outside admission: unauthenticated traffic never takes a slot
        keys = KeyRing([k.get_secret_value() for k in settings.api_keys])
        app.add_middleware(AuthMiddleware, keys=keys, metrics=admission_metrics)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)  # sees every status
    if settings.cors_origins:  # outermost: a preflight is answered before auth, and errors carry the headers
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-Timeout", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After"],
            allow_credentials=False,
            max_age=600,
        )
    return app
