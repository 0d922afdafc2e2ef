"""The page end to end: ``python -m service`` on a free port, headless Chromium on ``http://127.0.0.1:PORT/``.

Nothing is mocked. The model is ``demo_checkpoint``: the committed demo model (models/demo), served by the
transformers engine in a real uvicorn process (``demo_server``, tests/browser/conftest.py). A random
checkpoint would almost never emit the loc tokens a box needs; this one detects the synthetic shapes, so the
page gets real boxes from a real model.

The screenshot (an example clicked, one box hovered) lands in the test's temp directory, and in
``docs/images/page.png`` (shown by the README) when that file is missing or ``PALIGEMMA_UPDATE_SCREENSHOT=1``.
``PALIGEMMA_E2E_MODEL=DIR`` serves another model instead.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.browser.servers import ROOT, service, severe_logs, wait_answered, wait_for
from tests.demo_model import find_detection

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

pytestmark = [pytest.mark.browser, pytest.mark.slow]

SCREENSHOT = ROOT / "docs" / "images" / "page.png"
EXAMPLES_SHOWN = "return document.querySelectorAll('#examples .example').length"


@pytest.fixture(scope="module")
def segmenting_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The shipped segmenting model (models/demo-segment, a full checkpoint) with the shapes mask codebook."""
    folder = tmp_path_factory.mktemp("segmenting")
    weights = str(ROOT / "models" / "shapes-vae" / "vae-shapes.npz")
    model = str(ROOT / "models" / "demo-segment")
    with service(model, folder / "service.log", "--segmentation-weights", weights) as url:
        yield url


def _json_answer(driver: WebDriver) -> dict[str, object]:
    return dict(json.loads(driver.find_element("id", "json").text))


def test_clicking_an_example_draws_boxes(browser: WebDriver, demo_server: str, tmp_path: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    browser.set_window_size(1280, 1000)  # room for the picture in the screenshot
    browser.get(f"{demo_server}/")  # same origin as the API: the page's service URL stays empty
    assert browser.find_element("id", "service-url").get_attribute("value") == ""
    listed = httpx.get(f"{demo_server}/examples").json()["examples"]
    assert wait_for(browser, EXAMPLES_SHOWN) == len(listed) >= 3
    assert "serving demo" in browser.find_element("id", "model-info").text
    assert browser.find_element("id", "overlay").get_attribute("data-state") == "empty"

    browser.find_element("css selector", f'.example[data-file="{listed[0]["file"]}"]').click()
    overlay = wait_answered(browser)
    assert overlay["state"] == "drawn", browser.find_element("id", "error").text
    answer = _json_answer(browser)
    detections = answer["detections"]
    assert isinstance(detections, list) and int(overlay["detections"]) == len(detections) >= 1
    assert browser.find_element("id", "objects").get_attribute("value") == listed[0]["objects"]
    stats = browser.find_element("id", "stats")
    usage = answer["usage"]
    assert isinstance(usage, dict)
    assert stats.get_attribute("data-latency-ms") == str(answer["latency_ms"])
    assert stats.get_attribute("data-completion-tokens") == str(usage["completion_tokens"])
    assert f"{usage['prompt_tokens']} prompt" in stats.text

    # hovering a box highlights its JSON entry (and leaving it clears it)
    last = len(detections) - 1
    ActionChains(browser).move_to_element(browser.find_element("css selector", f'.box[data-index="{last}"]')).perform()
    entry = browser.find_element("css selector", f'#json .entry[data-index="{last}"]')
    assert "active" in str(entry.get_attribute("class"))
    assert json.loads(entry.text.rstrip(",")) == detections[last]
    assert severe_logs(browser) == []

    shot = tmp_path / "page.png"
    assert browser.save_screenshot(str(shot))
    if not SCREENSHOT.is_file() or os.environ.get("PALIGEMMA_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)


def test_detect_a_picked_file_with_max_objects(browser: WebDriver, demo_server: str, tmp_path: Path) -> None:
    def detect(png: bytes, name: str) -> dict[str, object]:
        response = httpx.post(
            f"{demo_server}/detect", files={"image": ("x.png", png)}, data={"objects": name}, timeout=60
        )
        response.raise_for_status()
        return dict(response.json())

    png, name = find_detection(detect)
    picture = tmp_path / "shapes.png"
    picture.write_bytes(png)
    browser.get(f"{demo_server}/")
    browser.find_element("id", "image-input").send_keys(str(picture))
    wait_for(browser, "return document.getElementById('overlay').dataset.state === 'image'")
    assert browser.execute_script("return document.getElementById('task').value") == "detect"
    browser.find_element("id", "objects").send_keys(name)
    browser.find_element("id", "max-objects").send_keys("1")
    browser.find_element("id", "submit").click()
    overlay = wait_answered(browser)
    assert overlay["state"] == "drawn", browser.find_element("id", "error").text
    assert overlay["detections"] == "1" and len(browser.find_elements("css selector", "#marks .box")) == 1
    assert "detect done" in browser.find_element("id", "status").text


def test_a_4xx_shows_the_api_message_over_the_picture(browser: WebDriver, demo_server: str) -> None:
    example = httpx.get(f"{demo_server}/examples").json()["examples"][0]
    png = httpx.get(f"{demo_server}{example['url']}").content
    expected = httpx.post(f"{demo_server}/detect", files={"image": ("x.png", png)}, data={"objects": "cat<dog"})
    assert 400 <= expected.status_code < 500
    message = expected.json()["error"]["message"]

    browser.get(f"{demo_server}/")
    wait_for(browser, EXAMPLES_SHOWN)
    browser.execute_script(
        "return fetch(arguments[0]).then(r => r.blob()).then(b => window.paligemma.setImage(b))", example["url"]
    )
    browser.find_element("id", "objects").send_keys("cat<dog")
    browser.find_element("id", "submit").click()
    assert wait_answered(browser)["state"] == "error"
    error = browser.find_element("id", "error")
    assert error.is_displayed() and error.text == message
    assert browser.find_element("id", "stage").is_displayed()  # the picture stays: never a blank panel
    assert json.loads(browser.find_element("id", "json").text)["error"]["message"] == message


def test_segment_from_the_page_draws_the_masks(browser: WebDriver, segmenting_server: str, tmp_path: Path) -> None:
    from finetune.data.synth import render

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
    wait_for(browser, "return document.getElementById('overlay').dataset.state === 'image'")
    browser.execute_script(
        "const task = document.getElementById('task'); task.value = 'segment';task.dispatchEvent(new Event('change'));"
    )
    browser.find_element("id", "objects").send_keys(objects)
    browser.find_element("id", "submit").click()
    overlay = wait_answered(browser)
    assert overlay["state"] == "drawn", browser.find_element("id", "error").text
    assert int(overlay["masks"]) == masks
    assert severe_logs(browser) == []


def test_ocr_answers_with_its_text_and_token_counts(browser: WebDriver, demo_server: str) -> None:
    from selenium.webdriver.support.ui import Select

    browser.get(f"{demo_server}/")
    wait_for(browser, EXAMPLES_SHOWN)
    browser.execute_script(
        "return fetch('examples/shapes-2-9.png').then(r => r.blob()).then(b => window.paligemma.setImage(b))"
    )
    Select(browser.find_element("id", "task")).select_by_value("ocr")
    assert not browser.find_element("id", "objects").is_displayed()
    browser.find_element("id", "submit").click()
    assert wait_answered(browser)["state"] == "drawn", browser.find_element("id", "error").text
    answer = _json_answer(browser)
    assert browser.find_element("id", "answer").text == str(answer["text"]).strip()
    usage = answer["usage"]
    assert isinstance(usage, dict) and usage["completion_tokens"] >= 1
    stats = browser.find_element("id", "stats")
    assert stats.get_attribute("data-completion-tokens") == str(usage["completion_tokens"])
    assert browser.find_element("id", "stage").is_displayed()
