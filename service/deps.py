"""Per-app state and the FastAPI dependencies routes use to reach it (``StateDep``, ``EngineDep``).

Routes never import a global engine: ``create_app`` stores one :class:`ServiceState` on ``app.state``,
the lifespan fills in ``engine``, and ``EngineDep`` answers 503 while there is none.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, cast

from fastapi import Depends, Request

from paligemma import SpecialIds
from service.engine import Engine
from service.errors import Unavailable
from service.images import ImageLimits
from service.metrics import Metrics
from service.settings import Settings


@dataclass
class ServiceState:
    """Everything one app instance owns."""

    settings: Settings
    metrics: Metrics
    limits: ImageLimits
    engine: Engine | None = None
    special_ids: SpecialIds | None = None
    """Where the tokenizer keeps its loc/seg tokens, read once when the engine is up."""
    decode_pool: ThreadPoolExecutor | None = None


def get_state(request: Request) -> ServiceState:
    return cast(ServiceState, request.app.state.service)


def get_engine(request: Request) -> Engine:
    """The loaded engine, or 503 ``not_ready`` (checked before the body is read)."""
    engine = get_state(request).engine
    if engine is None:
        raise Unavailable()
    return engine


StateDep = Annotated[ServiceState, Depends(get_state)]
EngineDep = Annotated[Engine, Depends(get_engine)]
