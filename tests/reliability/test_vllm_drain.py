"""SIGTERM under load with the vLLM engine: where it differs from transformers, the engine runs in a
separate engine-core process that must be shut down too. Every admitted request still finishes, the
process exits 0, and no engine-core process is left behind."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from tests.reliability.corpus import encode, noise
from tests.reliability.server import ServiceProcess

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_vllm_sigterm_during_load_exits_0(varied_checkpoint: Path) -> None:
    settings = {
        "engine": "vllm",
        "max_model_len": 256,
        "enforce_eager": "true",
        "kv_cache_gib": 1,
        "drain_timeout_s": 60,
        "max_new_tokens_limit": 150,
        "log_level": "info",
    }
    with ServiceProcess(varied_checkpoint, **settings) as server, ThreadPoolExecutor(6) as pool:
        children = psutil.Process(server.process.pid).children(recursive=True)
        image = encode(noise((64, 64)), "PNG")

        def post() -> httpx.Response:
            fields = {"max_new_tokens": "150"}
            return httpx.post(f"{server.url}/caption", files={"image": ("x.png", image)}, data=fields, timeout=120)

        futures = [pool.submit(post) for _ in range(6)]
        deadline = time.monotonic() + 30
        while server.metric("paligemma_admitted_requests", 'state="running"') < 6:
            assert time.monotonic() < deadline, "the requests were not admitted"
            time.sleep(0.02)
        server.sigterm()
        time.sleep(0.2)
        assert httpx.get(f"{server.url}/readyz", timeout=5).status_code == 503
        assert post().status_code == 503

        responses = [f.result() for f in futures]
        assert [r.status_code for r in responses] == [200] * 6, [r.text[:200] for r in responses]
        assert server.process.wait(timeout=60) == 0, server.log()[-3000:]
        time.sleep(1)
        assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
