"""The page hosted apart from the API: ``service/static`` from a plain file server, ``?service=`` naming the API.

``demo_server`` lists ``page_origin`` in ``cors_origins``: from there the model list, the examples and a
detection work. From an origin it does not list, the browser blocks the calls and the page says so.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from tests.browser.servers import severe_logs, static_site, wait_answered, wait_for

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def unlisted_origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with static_site(tmp_path_factory.mktemp("unlisted") / "http.log") as url:
        yield url


def test_from_an_allowed_origin_the_examples_and_detect_work(
    browser: WebDriver, demo_server: str, page_origin: str
) -> None:
    browser.get(f"{page_origin}/index.html?service={demo_server}")
    assert browser.find_element("id", "service-url").get_attribute("value") == demo_server
    wait_for(browser, "return document.querySelectorAll('#examples .example').length > 0")
    assert "serving demo" in browser.find_element("id", "model-info").text
    browser.find_element("css selector", "#examples .example").click()
    overlay = wait_answered(browser)
    assert overlay["state"] == "drawn", browser.find_element("id", "error").text
    assert int(overlay["detections"]) >= 1
    assert severe_logs(browser) == []


def test_from_an_unlisted_origin_the_page_says_it_cannot_reach_the_service(
    browser: WebDriver, demo_server: str, unlisted_origin: str
) -> None:
    browser.get(f"{unlisted_origin}/index.html?service={demo_server}")
    wait_for(browser, "return document.getElementById('model-info').textContent.includes('unavailable')")
    assert browser.find_element("id", "examples-bar").is_displayed() is False
    browser.execute_script(  # a picture of this page's own origin, so only the API call is cross-origin
        "return fetch('examples/shapes-2-6.png').then(r => r.blob()).then(b => window.paligemma.setImage(b))"
    )
    browser.find_element("id", "objects").send_keys("circle")
    browser.find_element("id", "submit").click()
    assert wait_answered(browser)["state"] == "error"
    assert "Could not reach the service" in browser.find_element("id", "error").text
