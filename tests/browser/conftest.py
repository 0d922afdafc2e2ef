"""Headless system Chromium driven by selenium, for tests of the static page (service/static/index.html).

``demo_server`` is one real ``python -m service`` process on the demo model for the whole session, which
allows ``page_origin`` (the page served apart from the API) through ``cors_origins``.

Chromium and chromedriver are Debian's (``tools/setup_browser.sh`` installs them). Without them the browser
tests skip, unless ``PALIGEMMA_REQUIRE_BROWSER`` is set (as ``make test`` and CI should), then they fail.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.browser.servers import service, static_site

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

STATIC_PAGE = Path(__file__).resolve().parents[2] / "service" / "static" / "index.html"

# --headless etc. as usual; the background-networking/component/sync flags stop Chromium's own traffic,
# which the closed network here refuses (and which would slow every start).
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,900",
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "browser: drives headless Chromium (tools/setup_browser.sh)")


def _require_browser() -> bool:
    return os.environ.get("PALIGEMMA_REQUIRE_BROWSER", "").strip().lower() not in ("", "0", "false", "no")


def _unavailable(reason: str) -> None:
    message = f"{reason}; run tools/setup_browser.sh (browser tests skip unless PALIGEMMA_REQUIRE_BROWSER is set)"
    if _require_browser():
        pytest.fail(message)
    pytest.skip(message)


def _executable(name: str, fallback: str) -> str | None:
    found = shutil.which(name)
    return found or (fallback if os.access(fallback, os.X_OK) else None)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    """A fresh headless Chromium (new profile directory) per test; quit afterwards."""
    chromium = _executable("chromium", "/usr/bin/chromium")
    chromedriver = _executable("chromedriver", "/usr/bin/chromedriver")
    if chromium is None or chromedriver is None:
        _unavailable("Debian's chromium and chromium-driver are not installed")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable("selenium is not installed (pip install -e '.[dev]')")
    options = webdriver.ChromeOptions()
    options.binary_location = str(chromium)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    service = Service(executable_path=str(chromedriver), log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)  # explicit paths: no Selenium Manager download
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def static_page_url() -> str:
    """``file://`` URL of the page (no server needed for layout and drawing tests)."""
    return STATIC_PAGE.as_uri()


@pytest.fixture(scope="session")
def page_origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``service/static`` from a plain file server: another origin, which ``demo_server`` allows."""
    with static_site(tmp_path_factory.mktemp("page-origin") / "http.log") as url:
        yield url


@pytest.fixture(scope="session")
def demo_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, page_origin: str
) -> Iterator[str]:
    """The demo model (or ``PALIGEMMA_E2E_MODEL=DIR``) in a real service process, CORS open to ``page_origin``."""
    model = os.environ.get("PALIGEMMA_E2E_MODEL") or str(request.getfixturevalue("demo_checkpoint"))
    log = tmp_path_factory.mktemp("demo-server") / "service.log"
    with service(model, log, "--cors-origins", page_origin) as url:
        yield url
