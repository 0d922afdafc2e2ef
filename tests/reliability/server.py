"""A real ``python -m service`` process on a free loopback port (transformers engine unless told otherwise)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import httpx

LEAK = re.compile(r"Traceback|File \"|0x[0-9a-fA-F]{6,}|/(?:work|home|usr|tmp|site-packages)/|\.py\b")
"""What must never appear in a response body: tracebacks, memory addresses, file paths."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def metric(url: str, name: str, labels: str = "") -> float:
    """One sample of ``url``'s ``/metrics`` (``labels`` as in the exposition, e.g. ``reason="overloaded"``)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    key = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


class ServiceProcess:
    """``with ServiceProcess(checkpoint, max_concurrent_requests=2) as server: httpx.get(server.url + ...)``.

    Keyword settings become ``PALIGEMMA_*`` variables (the same path the deploy files use); ``args`` are
    extra command-line flags, which win over the variables. Output goes to a log file, read back by
    :meth:`log` (a pipe nobody reads would block the server once full).
    """

    def __init__(self, checkpoint: Path, args: Sequence[str] = (), port: int | None = None, **settings: object) -> None:
        engine = str(settings.pop("engine", "transformers"))
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, **{f"PALIGEMMA_{k.upper()}": str(v) for k, v in settings.items()}}
        env.setdefault("PALIGEMMA_MAX_NEW_TOKENS", "3")
        env.setdefault("PALIGEMMA_LOG_LEVEL", "warning")
        self._log = tempfile.NamedTemporaryFile(prefix="service-", suffix=".log", delete=False)  # noqa: SIM115
        command = [sys.executable, "-m", "service", "--model", str(checkpoint), "--engine", engine]
        command += ["--host", "127.0.0.1", "--port", str(self.port), *args]
        self.process = subprocess.Popen(command, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 360) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"server not ready after {timeout_s}s:\n{self.log()[-3000:]}")

    def sigterm(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    def metric(self, name: str, labels: str = "") -> float:
        return metric(self.url, name, labels)

    def __enter__(self) -> ServiceProcess:
        try:
            self.wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)

    def __exit__(self, *exc: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]) -> None:
        self.close()
