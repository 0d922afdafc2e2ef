"""Graceful drain on SIGTERM, then exit 0.

Order (as vLLM ``--shutdown-timeout``, Triton ``--exit-timeout-secs``, TGI ``--graceful-termination-timeout``):

1. ``/readyz`` answers 503 ``draining`` and every new inference request gets 503 ``draining`` with
   ``Retry-After`` (:mod:`service.guards.admission`), so the load balancer moves traffic elsewhere;
2. admitted requests (running or waiting for a slot) finish, for at most ``drain_timeout_s``;
3. uvicorn's own graceful shutdown (``SHUTDOWN_GRACE_S``: requests still running are cancelled, which
   aborts them in the engine), the lifespan closes the engine, and the process exits with
   ``ServiceState.exit_code``: 0, or 1 if the engine died.

Plain uvicorn stops accepting at once on SIGTERM and re-raises the signal after shutdown, so the process
would end "killed by signal 15"; :class:`DrainingServer` handles SIGTERM itself instead. A second SIGTERM
skips the rest of the drain. SIGINT (Ctrl-C) keeps uvicorn's behaviour.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from types import FrameType

import uvicorn

from service.guards.admission import Admission

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 5
"""uvicorn's ``timeout_graceful_shutdown``: after the drain, how long stragglers get before cancellation."""


class DrainingServer(uvicorn.Server):
    """``uvicorn.Server`` whose SIGTERM drains admitted requests first and does not re-raise the signal."""

    def __init__(self, config: uvicorn.Config, admission: Admission, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.admission = admission
        self.drain_timeout_s = drain_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGTERM or self._loop is None:
            super().handle_exit(sig, frame)
            return
        # Runs in the main thread between two bytecodes of whatever the loop was doing: hand over safely.
        self._loop.call_soon_threadsafe(self._on_sigterm)

    def _on_sigterm(self) -> None:
        if self._drain is None:
            self._drain = asyncio.ensure_future(self.drain())
        else:
            log.warning("second SIGTERM: stopping without waiting for %d requests", self.admission.in_flight)
            self.should_exit = True

    async def drain(self) -> None:
        """Refuse new work, wait for admitted work (up to the drain timeout), then stop the server."""
        self.admission.draining = True
        log.info(
            "SIGTERM: draining %d in-flight requests (at most %gs)", self.admission.in_flight, self.drain_timeout_s
        )
        if await self.admission.wait_idle(self.drain_timeout_s):
            log.info("drained; shutting down")
        else:
            log.warning("drain timeout: %d requests still in flight will be cancelled", self.admission.in_flight)
        self.should_exit = True
