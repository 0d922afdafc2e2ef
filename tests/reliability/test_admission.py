"""Admission control, deadlines and auth against a real server process (transformers engine)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from tests.reliability.conftest import MAX_CONCURRENT, MAX_QUEUED
from tests.reliability.corpus import MULTIPART_HEADERS, encode, multipart_body, noise
from tests.reliability.server import LEAK, ServiceProcess

pytestmark = pytest.mark.slow
LIMIT = MAX_CONCURRENT + MAX_QUEUED


def _decodes(server: ServiceProcess) -> float:
    return server.metric("paligemma_image_decode_seconds_count")


def test_burst_of_5x_the_limit(server: ServiceProcess) -> None:
    """20 concurrent uploads of ~300 kB against 2 running + 2 waiting: the excess gets 503 + Retry-After
    fast, without its image being read or decoded, and every admitted request succeeds."""
    # bodies encoded beforehand, so the client's own multipart encoding is not in the measured time
    bodies = [multipart_body(encode(noise((320, 320), seed=i), "PNG"), b"cat") for i in range(5 * LIMIT)]
    decodes_before = _decodes(server)
    rejected_before = server.metric("paligemma_rejected_requests_total", 'reason="overloaded"')

    async def one(client: httpx.AsyncClient, body: bytes) -> tuple[int, float, httpx.Response]:
        start = time.perf_counter()
        response = await client.post("/detect", content=body, headers=MULTIPART_HEADERS)
        return response.status_code, time.perf_counter() - start, response

    async def burst() -> list[tuple[int, float, httpx.Response]]:
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
            return await asyncio.gather(*(one(client, body) for body in bodies))

    results = asyncio.run(burst())
    ok = [r for r in results if r[0] == 200]
    rejected = [r for r in results if r[0] == 503]
    assert len(ok) + len(rejected) == len(results), [(s, r.text[:200]) for s, _, r in results]
    assert len(ok) >= LIMIT and len(rejected) >= 2 * LIMIT, (len(ok), len(rejected))
    slowest, fastest_ok = max(r[1] for r in rejected), min(r[1] for r in ok)
    summary = f"{len(ok)} admitted, {len(rejected)} rejected; slowest rejection {slowest * 1000:.1f} ms"
    print(f"\nburst: {summary}, fastest admitted {fastest_ok * 1000:.1f} ms")  # noqa: T201
    # fast = never waits for the model: every rejection is back before the first admitted answer
    assert slowest < fastest_ok, f"a rejection took {slowest * 1000:.1f} ms"
    for _, _, response in rejected:
        assert response.headers["retry-after"] == "1"
        assert response.json()["error"]["code"] == "overloaded"
        assert response.json()["error"]["request_id"] == response.headers["x-request-id"]
    for _, _, response in ok:
        assert response.json()["image"] == {"width": 320, "height": 320}
    assert _decodes(server) - decodes_before == len(ok), "a rejected request's image was decoded"
    assert server.metric("paligemma_rejected_requests_total", 'reason="overloaded"') - rejected_before == len(rejected)
    # probes stay outside the limit, and the slots are all given back
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    assert server.metric("paligemma_admitted_requests", 'state="running"') == 0


def test_probes_answer_while_full(server: ServiceProcess) -> None:
    """With every slot taken by slow requests, /healthz /readyz /metrics still answer at once."""

    async def run() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            image = encode(noise((64, 64)), "PNG")
            slow = [
                asyncio.create_task(
                    client.post("/caption", files={"image": ("x.png", image)}, data={"max_new_tokens": "400"})
                )
                for _ in range(LIMIT)
            ]
            deadline = time.monotonic() + 30  # a hang guard
            while server.metric("paligemma_admitted_requests", 'state="running"') < MAX_CONCURRENT:
                assert time.monotonic() < deadline, "the slow requests never took every slot"
                await asyncio.sleep(0.02)
            for path in ("/healthz", "/readyz", "/metrics"):
                assert (await client.get(path)).status_code == 200
            # "at once" = without waiting for a slot: the probes are back while the slow requests still run
            assert not any(task.done() for task in slow)
            assert all(r.status_code == 200 for r in await asyncio.gather(*slow))

    asyncio.run(run())


def _in_flight(server: ServiceProcess) -> float:
    return server.metric("paligemma_engine_requests_in_flight") + server.metric("paligemma_engine_queue_depth")


def test_deadline_is_504_and_the_engine_lets_go(server: ServiceProcess) -> None:
    before = server.metric("paligemma_aborted_requests_total", 'reason="deadline_exceeded"')
    response = httpx.post(
        f"{server.url}/caption",
        files={"image": ("x.png", encode(noise((64, 64)), "PNG"))},
        data={"max_new_tokens": "400"},
        headers={"X-Request-Timeout": "0.05"},
        timeout=60,
    )
    assert response.status_code == 504, response.text
    assert response.json()["error"]["code"] == "deadline_exceeded"
    assert LEAK.search(response.text) is None
    assert server.metric("paligemma_aborted_requests_total", 'reason="deadline_exceeded"') == before + 1
    deadline = time.monotonic() + 15
    while _in_flight(server) > 0:
        assert time.monotonic() < deadline, "the engine still holds the request"
        time.sleep(0.1)
    assert server.metric("paligemma_admitted_requests", 'state="running"') == 0
    assert httpx.get(f"{server.url}/readyz").status_code == 200


def test_auth(tiny_checkpoint: Path) -> None:
    png = encode(noise((32, 32)), "PNG")
    with ServiceProcess(tiny_checkpoint, api_keys="key-one, key-two") as server:

        def call(headers: dict[str, str]) -> httpx.Response:
            return httpx.post(f"{server.url}/ocr", files={"image": ("x.png", png)}, headers=headers, timeout=30)

        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": "key-one"},
            {"Authorization": "Basic a2V5LW9uZQ=="},
            {"Authorization": "Bearer key-one-and-more"},
            {"Authorization": "Bearer"},
        ):
            response = call(headers)
            assert response.status_code == 401, (headers, response.text)
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert response.json()["error"]["code"] == "unauthorized"
            assert "key-one" not in response.text
        for key in ("key-one", "key-two"):
            assert call({"Authorization": f"Bearer {key}"}).status_code == 200
            assert call({"Authorization": f"bearer {key}"}).status_code == 200
        for path in ("/detect", "/vqa", "/caption", "/segment", "/nowhere"):
            assert httpx.post(f"{server.url}{path}", json={}).status_code == 401, path
        for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/"):
            assert httpx.get(f"{server.url}{path}").status_code == 200, path
        assert server.metric("paligemma_rejected_requests_total", 'reason="unauthorized"') >= 11
        spec = httpx.get(f"{server.url}/openapi.json").json()  # the schema says so too
        assert "401" in spec["paths"]["/detect"]["post"]["responses"]
        assert spec["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
        assert "key-one" not in server.log() and "key-two" not in server.log()
