"""The static page in headless Chromium, loaded from file:// (no service): form, RLE decoding, drawing, label
placement at the picture's edges."""

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
        "constrained",
        "max-objects",
        "adapter",
        "max-new-tokens",
        "api-key",
        "service-url",
        "submit",
        "status",
        "error",
        "overlay",
        "answer",
        "stats",
        "json",
        "examples",
    ):
        assert browser.find_element("id", element_id) is not None, element_id
    options = browser.execute_script("return [...document.getElementById('task').options].map(o => o.value)")
    assert options == ["detect", "segment", "vqa", "caption", "ocr"]
    assert browser.find_element("id", "api-key").get_attribute("type") == "password"
    assert _state(browser) == "empty"
    assert browser.execute_script("return typeof window.paligemma.drawResult") == "function"
    assert "service URL" in browser.find_element("id", "model-info").text  # from file://, nothing is fetched
    assert browser.get_log("browser") == []  # no script errors


def test_task_choice_shows_its_fields(browser: WebDriver, static_page_url: str) -> None:
    from selenium.webdriver.support.ui import Select

    browser.get(static_page_url)
    visible = "return [...document.querySelectorAll('label[id$=\"-field\"]:not([hidden])')].map(e => e.id.slice(0, -6))"
    expected = {
        "detect": ["objects", "constrained", "max-objects"],
        "segment": ["objects", "constrained", "max-objects"],
        "vqa": ["question", "lang"],
        "caption": ["lang", "detail"],
        "ocr": [],
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


def _pixel(driver: WebDriver, x: float, y: float) -> list[int]:
    """The canvas pixel under image pixel (x, y) of the picture shown."""
    script = """
    const c = document.getElementById('overlay'), s = c.width / arguments[2];
    const x = Math.floor(arguments[0] * s), y = Math.floor(arguments[1] * s);
    return Array.from(c.getContext('2d').getImageData(x, y, 1, 1).data);
    """
    return list(driver.execute_script(script, x, y, 160))[:3]


def test_draws_boxes_and_masks_over_the_picked_image(
    browser: WebDriver, static_page_url: str, synthetic_png: Path
) -> None:
    browser.get(static_page_url)
    _pick_image(browser, synthetic_png)
    width, height = browser.execute_script("const c = document.getElementById('overlay'); return [c.width, c.height]")
    assert width / height == pytest.approx(160 / 90, rel=0.01) and width > 160  # enlarged to the panel
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
    assert _pixel(browser, 60, 45) != [200, 60, 40]  # the mask tints the block
    assert _pixel(browser, 5, 5) == [235, 235, 235]
    colors = "return [...document.querySelectorAll('#marks .box')].map(e => getComputedStyle(e).borderTopColor)"
    first, second = browser.execute_script(colors)
    assert first != second  # one colour per class


def _marks(driver: WebDriver, detections: list[dict[str, Any]], size: tuple[int, int]) -> dict[str, Any]:
    payload = {"detections": detections, "image": {"width": size[0], "height": size[1]}}
    driver.execute_script("window.paligemma.drawResult(arguments[0], ['wide label name'])", payload)
    script = """
    const rect = (e) => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
    return {picture: rect(document.getElementById('overlay')),
            boxes: [...document.querySelectorAll('#marks .box')].map(rect),
            labels: [...document.querySelectorAll('#marks .label')].map(rect)};
    """
    return dict(driver.execute_script(script))


def test_labels_stay_inside_the_picture_and_off_their_object(
    browser: WebDriver, static_page_url: str, synthetic_png: Path
) -> None:
    browser.get(static_page_url)
    _pick_image(browser, synthetic_png)
    top_right = {"label": "wide label name", "box": {"x1": 150, "y1": 0, "x2": 160, "y2": 30}, "score": 0.5}
    bottom_left = {"label": "b", "box": {"x1": 0, "y1": 70, "x2": 20, "y2": 90}}
    full = {"label": "c", "box": {"x1": 0, "y1": 0, "x2": 160, "y2": 90}}
    got = _marks(browser, [top_right, bottom_left, full], (160, 90))
    left, top, right, bottom = got["picture"]
    for label in got["labels"]:
        assert left - 0.5 <= label[0] and label[2] <= right + 0.5 and top - 0.5 <= label[1] and label[3] <= bottom + 0.5
    (box0, box1, _), (label0, label1, label2) = got["boxes"], got["labels"]
    assert label0[1] >= box0[3] - 0.5  # no room above: below its box
    assert label0[2] == pytest.approx(right, abs=0.5)  # pushed left, inside the right edge
    assert label1[3] <= box1[1] + 0.5  # room above: above its box
    assert label2[1] == pytest.approx(top, abs=0.5)  # no room anywhere: inside the top of its box
    assert {round(label[3] - label[1], 2) for label in got["labels"]} == {18.0}


def test_unreachable_service_shows_an_error(browser: WebDriver, static_page_url: str, synthetic_png: Path) -> None:
    browser.get(static_page_url)
    _pick_image(browser, synthetic_png)
    browser.find_element("id", "objects").send_keys("block")
    browser.find_element("id", "submit").click()
    _wait(browser, "return document.getElementById('overlay').dataset.state === 'error'")
    error = browser.find_element("id", "error")
    assert error.is_displayed() and "Could not reach the service" in error.text
    assert browser.find_element("id", "submit").is_enabled()


def test_a_resized_window_refits_the_picture_and_its_boxes(
    browser: WebDriver, static_page_url: str, synthetic_png: Path
) -> None:
    browser.set_window_size(1280, 900)
    browser.get(static_page_url)
    _pick_image(browser, synthetic_png)
    box = {"label": "block", "box": {"x1": 30, "y1": 20, "x2": 90, "y2": 70}}
    wide = _marks(browser, [box], (160, 90))
    browser.set_window_size(600, 900)  # one column: a narrower panel
    narrow_width = "return document.getElementById('overlay').getBoundingClientRect().width"
    _wait(browser, f"{narrow_width} < {wide['picture'][2] - wide['picture'][0] - 1}")
    script = """
    const rect = (e) => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
    return [rect(document.getElementById('panel')), rect(document.getElementById('overlay')),
            rect(document.querySelector('#marks .box'))];
    """
    panel, picture, drawn = browser.execute_script(script)
    assert picture[0] >= panel[0] - 0.5 and picture[2] <= panel[2] + 0.5
    assert picture[1] >= panel[1] - 0.5 and picture[3] <= panel[3] + 0.5
    scale = (picture[2] - picture[0]) / 160
    expected = [picture[0] + 30 * scale, picture[1] + 20 * scale, picture[0] + 90 * scale, picture[1] + 70 * scale]
    assert max(abs(e - d) for e, d in zip(expected, drawn, strict=True)) <= 1.0
