"""Run an engine call that is aborted when the client disconnects or the deadline passes.

Starlette does not cancel a non-streaming handler when the client goes away, so a dropped request would
keep its slot in the engine until it finished. :func:`run_guarded` races the engine call against a task
that waits for ``http.disconnect`` (the body has been read by then, so the next ASGI message is the
disconnect) and cancels whichever loses; cancelling the engine call aborts the request inside the engine
(vLLM aborts on cancellation; the transformers engine drops a queued request).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

from service.errors import ClientClosedRequest, DeadlineExceeded

T = TypeVar("T")


async def _until_disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_guarded(request: Request, work: Awaitable[T], timeout_s: float) -> T:
    """``await work``, cancelled with :class:`DeadlineExceeded` after ``timeout_s`` seconds or with
    :class:`ClientClosedRequest` when the client disconnects first."""
    job = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        done, _ = await asyncio.wait({job, watcher}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        if job in done:
            return job.result()
        if watcher in done:
            raise ClientClosedRequest()
        raise DeadlineExceeded()
    finally:
        for task in (job, watcher):
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
