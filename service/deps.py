"""Per-app state and the FastAPI dependencies routes use to reach it (``StateDep``, ``EngineDep``).

Routes never import a global engine: ``create_app`` stores one :class:`ServiceState` on ``app.state``,
the lifespan fills in ``engine``, and ``EngineDep`` answers 503 while there is none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, cast

from fastapi import Depends, Request

from paligemma import SpecialIds
from paligemma.grammar import GrammarSpec
from paligemma.segmentation import MaskDecoder
from service.engines.protocol import Engine
from service.errors import Unavailable
from service.guards.admission import Admission
from service.images import ImageLimits
from service.metrics import Metrics
from service.model_input import UploadPool
from service.settings import Settings


@dataclass
class ServiceState:
    """Everything one app instance owns."""

    settings: Settings
    metrics: Metrics
    limits: ImageLimits
    admission: Admission
    """Admission limit and drain flag (issue 6)."""
    engine: Engine | None = None
    special_ids: SpecialIds | None = None
    """Where the tokenizer keeps its loc/seg tokens, read once when the engine is up."""
    uploads: UploadPool | None = None
    """The processes that decode uploads into the model's input, started once the engine is up."""
    mask_decoder: MaskDecoder | None = None
    """big_vision's mask decoder for ``/segment``, loaded at startup when ``segmentation_weights`` is set."""
    grammar_specs: dict[tuple[Any, ...], GrammarSpec] = field(default_factory=dict)
    """Detection grammars built for this engine, by labels and limits (service.api.routes.detection_grammar)."""
    exit_code: int = 0
    """Set to 1 when the engine died: ``python -m service`` exits with it."""
    request_exit: Callable[[], None] | None = None
    """Stops the server gracefully (set by ``python -m service``; None when embedded)."""


def state_of(request: Request) -> ServiceState:
    return cast(ServiceState, request.app.state.service)


async def get_state(request: Request) -> ServiceState:
    """The dependencies are ``async``: FastAPI runs a plain ``def`` one in its thread pool, a thread hand-off
    per dependency and request that the event loop paid for under load."""
    return state_of(request)


async def get_engine(request: Request) -> Engine:
    """The loaded engine, or 503 ``not_ready`` (checked before the body is read)."""
    engine = state_of(request).engine
    if engine is None:
        raise Unavailable()
    return engine


StateDep = Annotated[ServiceState, Depends(get_state)]
EngineDep = Annotated[Engine, Depends(get_engine)]
