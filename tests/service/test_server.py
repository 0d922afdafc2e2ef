"""The real thing: ``python -m service`` in its own process on a free loopback port, called over TCP
with a multipart upload (what the README's curl line sends) and with the Python clients."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from service.client import AsyncClient, Client, ServiceHTTPError
from tests.reliability.server import ServiceProcess
from tests.service.conftest import image_bytes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path) -> Iterator[str]:
    """Flags on the command line (they win over the environment's PALIGEMMA_MAX_NEW_TOKENS=3), settings
    from the environment too."""
    flags = ("--max-new-tokens", "5", "--log-level", "warning")
    with ServiceProcess(tiny_checkpoint, args=flags, max_batch_size=4) as process:
        yield process.url


def test_multipart_detect_over_tcp(server: str) -> None:
    response = httpx.post(
        f"{server}/detect",
        files={"image": ("x.png", image_bytes((80, 60)), "image/png")},
        data={"objects": "cat ; dog", "constrained": "false"},  # free: the random model runs to the limit
        timeout=60,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"detections", "image", "model", "text", "usage", "latency_ms"}
    assert body["image"] == {"width": 80, "height": 60}
    assert body["usage"]["completion_tokens"] == 5
    assert response.headers["x-request-id"]
    assert httpx.get(f"{server}/metrics").text.count("paligemma_http_requests_total{") >= 1


def test_sync_client(server: str, tmp_path: Path) -> None:
    path = tmp_path / "x.jpg"
    Image.new("RGB", (50, 40), "green").save(path)
    with Client(server) as client:
        assert client.ready()
        detect = client.detect(path, ["cat", "dog"], max_new_tokens=3, constrained=False)
        assert detect.image.width == 50 and detect.usage.completion_tokens == 3
        assert isinstance(client.vqa(Image.new("RGB", (30, 30)), "what is it?").answer, str)
        assert client.caption(path.read_bytes(), detail="long").usage.completion_tokens == 5
        assert isinstance(client.ocr(path).text, str)
        with pytest.raises(ServiceHTTPError) as info:
            client.detect(path, "<loc0001>")
        assert info.value.status == 422 and info.value.code == "bad_prompt"


def test_async_client_concurrently(server: str) -> None:
    async def run() -> None:
        async with AsyncClient(server) as client:
            assert await client.ready()
            image = Image.new("RGB", (40, 40), "white")
            results = await asyncio.gather(
                client.detect(image, "cat"), client.vqa(image, "why?"), client.caption(image), client.ocr(image)
            )
            assert [r.model for r in results] == [results[0].model] * 4
            with pytest.raises(ServiceHTTPError) as info:
                await client.ocr(b"not an image")
            assert info.value.status == 400

    asyncio.run(run())


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_readme_curl_line(server: str, tmp_path: Path) -> None:
    """The README's curl command; ``--form-string`` because curl's ``-F`` cuts a value at ``;``."""
    path = tmp_path / "x.png"
    path.write_bytes(image_bytes((70, 50)))
    command = ["curl", "-s", "-F", f"image=@{path}", "--form-string", "objects=cat ; dog", f"{server}/detect"]
    body = json.loads(subprocess.run(command, capture_output=True, check=True, timeout=60).stdout)
    assert set(body) == {"detections", "image", "model", "text", "usage", "latency_ms"}
    assert body["image"] == {"width": 70, "height": 50}
