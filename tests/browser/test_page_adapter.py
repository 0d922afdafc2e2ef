"""The adapter menu on the demo models: vLLM serves models/demo with models/demo-diamond as the per-request
adapter ``diamond`` (the transformers engine serves no per-request adapters), the page lists both from
``/v1/models``, and on the diamonds example the adapter's answer names diamonds where the base's does not.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
from selenium.webdriver.support.ui import Select

from tests.browser.servers import ROOT, service, severe_logs, wait_answered, wait_for

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.vllm]


@pytest.fixture(scope="module")
def adapter_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    vllm = ["--enforce-eager", "true", "--kv-cache-gib", "1", "--max-model-len", "512", "--max-num-seqs", "4"]
    adapter = f"diamond={ROOT / 'models' / 'demo-diamond'}"
    log = tmp_path_factory.mktemp("adapter-server") / "service.log"
    with service(str(ROOT / "models" / "demo"), log, *vllm, "--lora", adapter, engine="vllm", timeout=420) as url:
        yield url


def _run_diamonds_example(driver: WebDriver) -> dict[str, object]:
    driver.find_element("css selector", '.example[data-file="diamonds-13-9.png"]').click()
    overlay = wait_answered(driver, timeout=180)
    assert overlay["state"] == "drawn", driver.find_element("id", "error").text
    return dict(json.loads(driver.find_element("id", "json").text))


def test_choosing_the_adapter_changes_the_answer(browser: WebDriver, adapter_server: str) -> None:
    browser.get(f"{adapter_server}/")
    wait_for(browser, "return document.getElementById('adapter').options.length === 2")
    adapter = Select(browser.find_element("id", "adapter"))
    assert [(o.get_attribute("value"), o.text) for o in adapter.options] == [
        ("", "demo (base)"),
        ("diamond", "diamond"),
    ]
    wait_for(browser, "return document.querySelectorAll('#examples .example').length > 0")

    base = _run_diamonds_example(browser)
    adapter.select_by_value("diamond")
    tuned = _run_diamonds_example(browser)

    assert tuned["text"] != base["text"]
    labels = [d["label"] for d in tuned["detections"]]  # type: ignore[attr-defined]
    assert "diamond" in labels, tuned
    assert "diamond" not in [d["label"] for d in base["detections"]]  # type: ignore[attr-defined]
    assert severe_logs(browser) == []
