"""One shared server for the reliability suite: admission limit 2 running + 2 waiting, 3 new tokens."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reliability.server import ServiceProcess

MAX_CONCURRENT = 2
MAX_QUEUED = 2


@pytest.fixture(scope="session")
def server(tiny_checkpoint: Path) -> Iterator[ServiceProcess]:
    settings = {"max_concurrent_requests": MAX_CONCURRENT, "max_queued_requests": MAX_QUEUED, "max_batch_size": 4}
    with ServiceProcess(tiny_checkpoint, **settings) as process:
        yield process
