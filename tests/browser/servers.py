"""Real processes for the browser tests: ``python -m service`` on a free port, and a plain static file server
(another origin for the page, as when it is hosted apart from the API)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

ROOT = Path(__file__).resolve().parents[2]
STATIC = ROOT / "service" / "static"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _wait_ready(process: subprocess.Popen[bytes], url: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            pytest.fail(f"{url} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{url} was not ready in {timeout:.0f} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


@contextlib.contextmanager
def service(model: str, log: Path, *extra: str, engine: str = "transformers", timeout: float = 180) -> Iterator[str]:
    """Base URL of a real ``python -m service`` process serving ``model`` as ``demo`` (SIGTERM afterwards)."""
    port = free_port()
    command = [sys.executable, "-m", "service", "--model", model, "--engine", engine, "--model-name", "demo"]
    command += ["--host", "127.0.0.1", "--port", str(port), *extra]
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(process, f"{url}/readyz", log, timeout)
        yield url
    finally:
        _stop(process)


@contextlib.contextmanager
def static_site(log: Path, port: int | None = None) -> Iterator[str]:
    """``service/static`` served by ``python -m http.server``: the page at another origin than the API."""
    port = port or free_port()
    command = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(STATIC)]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(process, f"{url}/index.html", log, 30)
        yield url
    finally:
        _stop(process)


def wait_for(driver: WebDriver, script: str, timeout: float = 60) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: d.execute_script(script))


def wait_answered(driver: WebDriver, timeout: float = 120) -> dict[str, str]:
    """The overlay's data-* once the page has drawn an answer or an error."""
    state = "return ['drawn', 'error'].includes(document.getElementById('overlay').dataset.state)"
    wait_for(driver, state, timeout)
    return dict(driver.execute_script("return Object.assign({}, document.getElementById('overlay').dataset)"))


def severe_logs(driver: WebDriver) -> list[dict[str, Any]]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
