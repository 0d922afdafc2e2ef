"""The static page in headless Chromium, loaded from file:// (no service): form, RLE decoding, drawing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from PIL import Image

from paligemma.masks import encode_rle, mask_to_json

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

pytestmark = pytest.mark.browser


def _wait(driver: WebDriver, script: str, timeout: float = 10) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: d.execute_script(script))


def _state(driver: WebDriver) -> str:
    return str(driver.execute_script("return document.getElementById('overlay').dataset.state"))


def _pick_image(driver: WebDriver, path: Path) -> None:
    driver.find_element("id", "image-input").send_keys(str(path))
    _wait(driver, "return document.getElementById('overlay').dataset.state === 'image'")


@pytest.fixture
def synthetic_png(tmp_path: Path) -> Path:
    pixels = np.full((90, 160, 3), 235, np.uint8)
    pixels[20:70, 30:90] = (200, 60, 40)  # a red block to "detect"
    path = tmp_path / "synthetic.png"
    Image.fromarray(pixels).save(path)
    return path


def test_form_elements_exist(browser: WebDriver, static_page_url: str) -> None:
    browser.get(static_page_url)
    for element_id in (
        "request-form",
        "image-input",
        "task",
        "objects",
        "question",
        "lang",
        "detail",
        "api-key",
        "service-url",
        "submit",
        "status",
        "error",
        "overlay",
        "answer",
        "json",
    ):
        assert browser.find_element("id", element_id) is not None, element_id
    options = browser.execute_script("return [...document.getElementById('task').options].map(o => o.value)")
    assert options == ["detect", "segment", "vqa", "caption"]
    assert browser.find_element("id", "api-key").get_attribute("type") == "password"
    assert _state(browser) == "empty"
    assert browser.execute_script("return typeof window.paligemma.drawResult") == "function"
    assert browser.get_log("browser") == []  # no script errors


def test_task_choice_shows_its_fields(browser: WebDriver, static_page_url: str) -> None:
    from selenium.webdriver.support.ui import Select

    browser.get(static_page_url)
    visible = "return [...document.querySelectorAll('label[id$=\"-field\"]:not([hidden])')].map(e => e.id.slice(0, -6))"
    expected = {
        "detect": ["objects"],
        "segment": ["objects"],
        "vqa": ["question", "lang"],
        "caption": ["lang", "detail"],
    }
    for task, fields in expected.items():
        Select(browser.find_element("id", "task")).select_by_value(task)
        assert browser.execute_script(visible) == fields, task


@pytest.mark.parametrize("seed", [0, 1])
def test_js_rle_decoder_matches_pycocotools(browser: WebDriver, static_page_url: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    mask = np.zeros((37, 53), bool)
    mask[5:30, 10:45] = rng.random((25, 35)) > 0.3
    mask[0, 0] = mask[-1, -1] = True  # runs at both ends
    big = np.zeros((600, 900), bool)
    big[100:500, 50:850] = True  # long runs: multi-group counts
    browser.get(static_page_url)
    for expected in (mask, big):
        rle = encode_rle(expected)
        decoded = browser.execute_script(
            "const m = window.paligemma.rleToMask(arguments[0]); return [m.width, m.height, Array.from(m.data)];", rle
        )
        width, height, data = decoded
        assert (height, width) == expected.shape
        np.testing.assert_array_equal(np.asarray(data, bool).reshape(height, width), expected)


def test_draws_boxes_and_masks_over_the_picked_image(
    browser: WebDriver, static_page_url: str, synthetic_png: Path
) -> None:
    browser.get(static_page_url)
    _pick_image(browser, synthetic_png)
    assert browser.execute_script("const c = document.getElementById('overlay'); return [c.width, c.height]") == [
        160,
        90,
    ]
    mask = np.zeros((90, 160), bool)
    mask[20:70, 30:90] = True
    payload = {
        "detections": [
            {
                "label": "block",
                "box": {"x1": 30, "y1": 20, "x2": 90, "y2": 70},
                "score": 0.9,
                "mask": mask_to_json(mask),
            },
            {"label": "corner", "box": {"x1": 120, "y1": 60, "x2": 150, "y2": 85}},
        ],
        "image": {"width": 160, "height": 90},
    }
    assert (
        browser.execute_script("return window.paligemma.drawResult(JSON.parse(arguments[0]))", json.dumps(payload)) == 2
    )
    data = browser.execute_script("return Object.assign({}, document.getElementById('overlay').dataset)")
    assert data == {"state": "drawn", "detections": "2", "masks": "1"}
    pixel = "return Array.from(document.getElementById('overlay').getContext('2d').getImageData(60, 45, 1, 1).data)"
    assert browser.execute_script(pixel)[:3] != [200, 60, 40]  # the mask tints the block
    outside = "return Array.from(document.getElementById('overlay').getContext('2d').getImageData(5, 5, 1, 1).data)"
    assert browser.execute_script(outside)[:3] == [235, 235, 235]


def test_unreachable_service_shows_an_error(browser: WebDriver, static_page_url: str, synthetic_png: Path) -> None:
    browser.get(static_page_url)
    _pick_image(browser, synthetic_png)
    browser.find_element("id", "objects").send_keys("block")
    browser.find_element("id", "submit").click()
    _wait(browser, "return document.getElementById('overlay').dataset.state === 'error'")
    error = browser.find_element("id", "error")
    assert error.is_displayed() and "Could not reach the service" in error.text
    assert browser.find_element("id", "submit").is_enabled()
