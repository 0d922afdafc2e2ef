"""The picture fits its panel and the marks land on it, at any resolution: measured in Chromium's layout.

One held-out 112-px demo image, and the same picture stretched to a tall 600x1800 PNG and a 4000x3000 (12 MP)
JPEG: the model's processor resizes every upload to 112x112, so the demo model sees nearly the same picture
and answers boxes in each upload's own pixels. Each is picked in the page and detected by the real demo
model (``demo_server``); the drawn boxes and labels are then measured with ``getBoundingClientRect``.
On the page before issue 38 (canvas at the image's own size, CSS-scaled, labels sized in image pixels),
measured in this browser at 1280x1000: labels 92.9, 31.4 and 23.9 px tall on screen for these three, and
the tall picture drawn 650x1951, far below its panel.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from PIL import Image

from tests.browser.servers import severe_logs, wait_answered, wait_for
from tests.demo_model import heldout_image

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

pytestmark = [pytest.mark.browser, pytest.mark.slow]

OBJECTS = "circle ; square ; triangle"
TOLERANCE_PX = 1.0
MEASURE = """
const rect = (e) => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
const all = (sel) => [...document.querySelectorAll(sel)].map(rect);
return {panel: rect(document.getElementById('panel')), picture: rect(document.getElementById('overlay')),
        boxes: all('#marks .box'), labels: all('#marks .label'),
        json: document.getElementById('json').textContent};
"""


def _uploads(folder: Path) -> dict[str, Path]:
    """The 112-px held-out image (index 6, four shapes), and it stretched tall and to 12 MP."""
    png, _ = heldout_image(6)
    small = folder / "small.png"
    small.write_bytes(png)
    picture = Image.open(small).convert("RGB")
    tall, photo = folder / "tall.png", folder / "photo.jpg"
    picture.resize((600, 1800), Image.Resampling.BICUBIC).save(tall)
    picture.resize((4000, 3000), Image.Resampling.BICUBIC).save(photo, quality=90)
    return {"small": small, "tall": tall, "photo": photo}


def _detect_in_page(driver: WebDriver, server: str, path: Path) -> dict[str, Any]:
    driver.get(f"{server}/")
    driver.find_element("id", "image-input").send_keys(str(path))
    wait_for(driver, "return document.getElementById('overlay').dataset.state === 'image'")
    driver.find_element("id", "objects").send_keys(OBJECTS)
    driver.find_element("id", "submit").click()
    overlay = wait_answered(driver, timeout=180)
    assert overlay["state"] == "drawn", driver.find_element("id", "error").text
    return dict(driver.execute_script(MEASURE))


def _inside(inner: list[float], outer: list[float], slack: float = 0.5) -> bool:
    return (
        inner[0] >= outer[0] - slack
        and inner[1] >= outer[1] - slack
        and inner[2] <= outer[2] + slack
        and inner[3] <= outer[3] + slack
    )


def test_boxes_land_on_their_pixels_and_labels_keep_one_size(
    browser: WebDriver, demo_server: str, tmp_path: Path
) -> None:
    browser.set_window_size(1280, 1000)
    label_heights: dict[str, float] = {}
    for name, path in _uploads(tmp_path).items():
        measured = _detect_in_page(browser, demo_server, path)
        answer = json.loads(measured["json"])
        width, height = Image.open(path).size
        assert answer["image"] == {"width": width, "height": height}
        picture, detections = measured["picture"], answer["detections"]
        assert detections, f"{name}: the demo model found nothing"

        # the whole picture is in its panel, at its own aspect ratio, touching two sides of the panel
        assert _inside(picture, measured["panel"]), name
        scale = (picture[2] - picture[0]) / width
        assert (picture[3] - picture[1]) / height == pytest.approx(scale, rel=1e-3), name
        gaps = [abs(p - q) for p, q in zip(picture, measured["panel"], strict=True)]
        assert sorted(gaps)[1] < TOLERANCE_PX, name

        assert len(measured["boxes"]) == len(measured["labels"]) == len(detections)
        for det, box, label in zip(detections, measured["boxes"], measured["labels"], strict=True):
            b = det["box"]
            expected = [picture[0] + b["x1"] * scale, picture[1] + b["y1"] * scale]
            expected += [picture[0] + b["x2"] * scale, picture[1] + b["y2"] * scale]
            assert max(abs(e - m) for e, m in zip(expected, box, strict=True)) <= TOLERANCE_PX, (name, det, box)
            assert _inside(label, picture), (name, label, picture)
            room = (box[1] - picture[1]) >= label[3] - label[1] or (picture[3] - box[3]) >= label[3] - label[1]
            if room:  # the label sits above or below its box, never over the object
                assert label[3] <= box[1] + 0.5 or label[1] >= box[3] - 0.5, (name, label, box)
        heights = {round(label[3] - label[1], 2) for label in measured["labels"]}
        assert len(heights) == 1, (name, heights)
        label_heights[name] = heights.pop()
        assert severe_logs(browser) == []

    assert len(set(label_heights.values())) == 1, label_heights
    assert 12 <= label_heights["small"] <= 24  # readable, and a small part of the picture
