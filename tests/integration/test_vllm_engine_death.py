"""When vLLM's engine core dies, /readyz turns 503 at once and ``python -m service`` exits non-zero."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.integration.test_vllm_service import _free_port

pytestmark = pytest.mark.vllm


def test_engine_death_makes_the_process_exit_nonzero(varied_checkpoint: Path) -> None:
    port = _free_port()
    command = [sys.executable, "-m", "service", "--model", str(varied_checkpoint), "--engine", "vllm"]
    command += ["--port", str(port), "--max-model-len", "256", "--enforce-eager", "true", "--kv-cache-gib", "1"]
    process = subprocess.Popen(command, env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        assert httpx.get(f"{url}/readyz", timeout=2).status_code == 200

        children = psutil.Process(process.pid).children(recursive=True)
        core = [c for c in children if "EngineCore" in " ".join([c.name(), *c.cmdline()])]
        assert core, [c.name() for c in children]
        for child in core:
            child.kill()
        killed_at = time.monotonic()

        ready_after_death: list[float] = []  # times /readyz still said 200 after the kill
        while process.poll() is None and time.monotonic() - killed_at < 30:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    ready_after_death.append(time.monotonic() - killed_at)
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        exited_after = time.monotonic() - killed_at
        assert process.poll() is not None, "the service kept running with a dead engine"
        assert process.returncode == 1
        assert exited_after < 20
        # vLLM notices the dead core within its own health-check period; never ready after that
        assert all(t < 2.0 for t in ready_after_death), ready_after_death
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)
