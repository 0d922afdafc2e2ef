"""Every endpoint through the real vLLM engine (CPU build), served by a real uvicorn on loopback.

The server runs in a thread of this process so the tests can also look at the engine's own counters.
"""

from __future__ import annotations

import asyncio
import io
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

from service.app import create_app
from tests.integration.conftest import vllm_settings

pytestmark = pytest.mark.vllm


def _png(seed: int = 0, size: tuple[int, int] = (160, 90)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Server:
    def __init__(self, app: Any) -> None:
        self.app = app
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def engine(self) -> Any:
        return self.app.state.service.engine

    def __enter__(self) -> _Server:
        self.thread.start()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError("the vLLM service did not become ready")

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(60)


@pytest.fixture(scope="module")
def server(varied_checkpoint: Path, lora_adapter: Path) -> Iterator[_Server]:
    with _Server(create_app(vllm_settings(varied_checkpoint, lora_adapter))) as running:
        yield running


def _wait_idle(server: _Server) -> float:
    for _ in range(100):
        if server.engine.stats()["engine_unfinished"] == 0:
            break
        time.sleep(0.05)
    return float(server.engine.stats()["engine_unfinished"])


def test_detect_multipart_and_json(server: _Server) -> None:
    import base64

    png = _png()
    multipart = httpx.post(
        f"{server.url}/detect", files={"image": ("x.png", png, "image/png")}, data={"objects": "cat ; dog"}, timeout=60
    )
    as_json = httpx.post(
        f"{server.url}/detect",
        json={"image": base64.b64encode(png).decode(), "objects": ["cat", "dog"]},
        timeout=60,
    )
    for response in (multipart, as_json):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["image"] == {"width": 160, "height": 90}
        assert body["usage"]["completion_tokens"] >= 1
        assert isinstance(body["detections"], list)
    assert multipart.json()["text"] == as_json.json()["text"]  # same prompt, same image, greedy


@pytest.mark.parametrize(
    ("path", "fields", "key"),
    [
        ("/vqa", {"question": "how many shapes are there?"}, "answer"),
        ("/caption", {"lang": "en"}, "text"),
        ("/caption", {"detail": "long"}, "text"),
        ("/ocr", {}, "text"),
    ],
)
def test_text_endpoints(server: _Server, path: str, fields: dict[str, str], key: str) -> None:
    response = httpx.post(f"{server.url}{path}", files={"image": ("x.png", _png(1), "image/png")}, data=fields)
    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body[key], str) and body["usage"]["completion_tokens"] >= 1


def test_sixteen_concurrent_requests(server: _Server) -> None:
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            return list(
                await asyncio.gather(
                    *(client.post("/caption", files={"image": ("x.png", _png(i), "image/png")}) for i in range(16))
                )
            )

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 16
    assert _wait_idle(server) == 0


def test_adapter_changes_output_and_unknown_adapter_is_400(server: _Server) -> None:
    files = {"image": ("x.png", _png(2), "image/png")}
    base = httpx.post(f"{server.url}/caption", files=files, data={"max_new_tokens": "12"}, timeout=60)
    adapted = httpx.post(
        f"{server.url}/caption", files=files, data={"max_new_tokens": "12", "adapter": "shapes"}, timeout=60
    )
    unknown = httpx.post(f"{server.url}/caption", files=files, data={"adapter": "nope"}, timeout=60)
    assert base.status_code == adapted.status_code == 200
    assert adapted.json()["text"] != base.json()["text"]
    assert unknown.status_code == 400 and unknown.json()["error"]["code"] == "unknown_adapter"


def test_openai_client_picks_the_adapter_through_model(server: _Server) -> None:
    import base64

    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    base_name = server.engine.model_name
    assert [m.id for m in client.models.list()] == [base_name, "shapes"]
    png = _png(2)
    content = [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}},
        {"type": "text", "text": "caption en"},
    ]

    def chat(model: str) -> str:
        messages = [{"role": "user", "content": content}]
        answer = client.chat.completions.create(model=model, messages=messages, max_tokens=12)  # type: ignore[arg-type]
        return str(answer.choices[0].message.content)

    files = {"image": ("x.png", png, "image/png")}
    fields = {"max_new_tokens": "12", "adapter": "shapes"}
    adapted = httpx.post(f"{server.url}/caption", files=files, data=fields, timeout=60).json()["text"]
    assert chat("shapes") == adapted != chat(base_name)


def _aborted(server: _Server, reason: str) -> float:
    metrics = httpx.get(f"{server.url}/metrics").text
    line = next(
        x for x in metrics.splitlines() if x.startswith(f'paligemma_aborted_requests_total{{reason="{reason}"}}')
    )
    return float(line.split()[-1])


def test_deadline_returns_504_and_aborts(server: _Server) -> None:
    before = _aborted(server, "deadline_exceeded")
    response = httpx.post(
        f"{server.url}/caption",
        files={"image": ("x.png", _png(3), "image/png")},
        data={"max_new_tokens": "400"},
        headers={"X-Request-Timeout": "0.05"},
        timeout=60,
    )
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "deadline_exceeded"
    assert _aborted(server, "deadline_exceeded") == before + 1
    assert _wait_idle(server) == 0


def test_client_disconnect_aborts(server: _Server) -> None:
    before = _aborted(server, "client_closed")

    async def send_then_hang_up() -> float:
        async with httpx.AsyncClient(base_url=server.url) as client:
            task = asyncio.create_task(
                client.post(
                    "/caption",
                    files={"image": ("x.png", _png(4), "image/png")},
                    data={"max_new_tokens": "400"},
                    timeout=60,
                )
            )
            for _ in range(200):  # until vLLM holds the request
                await asyncio.sleep(0.01)
                if server.engine.stats()["engine_unfinished"] >= 1:
                    break
            running = float(server.engine.stats()["engine_unfinished"])
            task.cancel()  # closes the connection
            with pytest.raises(asyncio.CancelledError):
                await task
            return running

    assert asyncio.run(send_then_hang_up()) == 1
    assert _wait_idle(server) == 0
    for _ in range(50):
        if _aborted(server, "client_closed") == before + 1:
            break
        time.sleep(0.1)
    assert _aborted(server, "client_closed") == before + 1


def test_metrics_show_vllm_and_app_series(server: _Server) -> None:
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "paligemma_http_requests_total" in metrics
    assert 'paligemma_model_info{engine="vllm"' in metrics
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert name in metrics
