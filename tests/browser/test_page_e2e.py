"""The page end to end: ``python -m service`` on a free port, headless Chromium on ``http://127.0.0.1:PORT/``.

Nothing is mocked. The model is ``demo_checkpoint``: the committed demo model (models/demo), served by the
transformers engine in a real uvicorn process. A random checkpoint would almost never emit the loc tokens a
box needs; this one detects the synthetic shapes, so the page gets real boxes from a real model. The image
and object name are picked by asking the running service's ``/detect`` (over HTTP) which held-out image
gives a box.

The screenshot lands in the test's temp directory, and in ``docs/images/page.png`` (shown by the README)
when that file is missing or ``PALIGEMMA_UPDATE_SCREENSHOT=1``. ``PALIGEMMA_E2E_MODEL=DIR`` serves another
model instead.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from tests.demo_model import find_detection

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "docs" / "images" / "page.png"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _service(model: str, log: Path, *extra: str) -> Iterator[str]:
    """Base URL of a real ``python -m service`` process serving ``model`` (stopped with SIGTERM afterwards)."""
    port = _free_port()
    command = [sys.executable, "-m", "service", "--model", model, "--engine", "transformers"]
    command += ["--model-name", "demo", "--host", "127.0.0.1", "--port", str(port), "--max-new-tokens", "24", *extra]
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                pytest.fail(f"the service exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the service was not ready in 180 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The demo model (or ``PALIGEMMA_E2E_MODEL``) in a real service process."""
    model = os.environ.get("PALIGEMMA_E2E_MODEL") or str(request.getfixturevalue("demo_checkpoint"))
    with _service(model, tmp_path_factory.mktemp("server") / "service.log") as url:
        yield url


@pytest.fixture(scope="module")
def segmenting_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The shipped segmenting adapter (models/demo-segment), merged, with the shapes mask codebook."""
    from finetune.config import MergeConfig
    from finetune.merge import merge

    folder = tmp_path_factory.mktemp("segmenting")
    merged = merge(MergeConfig(run=str(ROOT / "models" / "demo-segment"), out=str(folder / "m"), dtype="float32"))
    weights = str(ROOT / "models" / "shapes-vae" / "vae-shapes.npz")
    with _service(str(merged), folder / "service.log", "--segmentation-weights", weights) as url:
        yield url


def _wait(driver: WebDriver, script: str, timeout: float = 60) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: d.execute_script(script))


def test_detect_from_the_page(browser: WebDriver, server: str, tmp_path: Path) -> None:
    def detect(png: bytes, name: str) -> dict[str, Any]:
        response = httpx.post(f"{server}/detect", files={"image": ("x.png", png)}, data={"objects": name}, timeout=60)
        response.raise_for_status()
        return dict(response.json())

    png, name = find_detection(detect)
    expected = len(detect(png, name)["detections"])
    picture = tmp_path / "shapes.png"
    picture.write_bytes(png)

    browser.set_window_size(1280, 1000)  # room for the picture in the screenshot
    browser.get(f"{server}/")  # same origin as the API: the page's service URL stays empty
    assert browser.title and browser.find_element("id", "service-url").get_attribute("value") == ""
    browser.find_element("id", "image-input").send_keys(str(picture))
    _wait(browser, "return document.getElementById('overlay').dataset.state === 'image'")
    assert browser.execute_script("return document.getElementById('task').value") == "detect"
    browser.find_element("id", "objects").send_keys(name)
    browser.find_element("id", "submit").click()
    _wait(browser, "return ['drawn', 'error'].includes(document.getElementById('overlay').dataset.state)")

    overlay = browser.execute_script("return Object.assign({}, document.getElementById('overlay').dataset)")
    assert overlay["state"] == "drawn", browser.find_element("id", "error").text
    assert int(overlay["detections"]) >= 1 and int(overlay["detections"]) == expected
    assert '"detections"' in browser.find_element("id", "json").text
    assert "detect done" in browser.find_element("id", "status").text
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []

    shot = tmp_path / "page.png"
    assert browser.save_screenshot(str(shot))
    if not SCREENSHOT.is_file() or os.environ.get("PALIGEMMA_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)


def test_segment_from_the_page_draws_the_masks(browser: WebDriver, segmenting_server: str, tmp_path: Path) -> None:
    from finetune.synth import render

    image, shapes = render(seed=23, index=0)  # a held-out image of the segmenting model's card
    picture = tmp_path / "shapes.png"
    image.save(picture)
    objects = shapes[0].kind  # one class per request, as models/demo-segment was trained
    response = httpx.post(
        f"{segmenting_server}/segment", files={"image": ("x.png", picture.read_bytes())}, data={"objects": objects}
    )
    response.raise_for_status()
    masks = sum(d["mask"] is not None for d in response.json()["detections"])
    assert masks >= 1, response.text

    browser.get(f"{segmenting_server}/")
    browser.find_element("id", "image-input").send_keys(str(picture))
    _wait(browser, "return document.getElementById('overlay').dataset.state === 'image'")
    browser.execute_script(
        "const task = document.getElementById('task'); task.value = 'segment';task.dispatchEvent(new Event('change'));"
    )
    browser.find_element("id", "objects").send_keys(objects)
    browser.find_element("id", "submit").click()
    _wait(browser, "return ['drawn', 'error'].includes(document.getElementById('overlay').dataset.state)")
    overlay = browser.execute_script("return Object.assign({}, document.getElementById('overlay').dataset)")
    assert overlay["state"] == "drawn", browser.find_element("id", "error").text
    assert int(overlay["masks"]) == masks
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
