"""``docker compose up`` for real: the CPU image built from the Dockerfile, run with Prometheus, checked live.

Exactly ``docker compose -f docker-compose.yml -f docker-compose.cpu.yml up -d --build paligemma prometheus``
(the README's CPU command, minus Grafana) on podman (``tests/deploy/compose_stack.py``), with the image's
default model: the demo model it bakes in. Then, against the running containers: the health check turns the
service healthy; ``/detect`` through the published port answers what ``python -m service`` outside a
container answers; the process runs as UID 10001 and can write only ``/cache`` and ``/tmp``; Prometheus
scrapes it; ``docker compose down`` with requests in flight lets them finish and the service exits 0 within
``stop_grace_period`` (Prometheus exits 0 too). Teardown removes every container, volume and network of the
project, and fails if any is left. Skips when podman is missing unless ``PALIGEMMA_REQUIRE_CONTAINERS`` is set
(``make test`` sets it), then fails. Not run: Grafana (no image here) and the ``gpu`` target (a CUDA base image).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.demo_model import DEMO_MODEL, heldout_image
from tests.deploy.compose_stack import ComposeStack, _seconds, engine_problem, state_health
from tests.reliability.server import ServiceProcess, metric

OBJECTS = "circle ; square ; triangle"
IMAGES = range(4)
HELD = 4
"""Requests held half-sent across ``docker compose down``."""


def _required() -> bool:
    return os.environ.get("PALIGEMMA_REQUIRE_CONTAINERS", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="module")
def stack() -> Iterator[ComposeStack]:
    problem = engine_problem()
    if problem:
        message = f"{problem}; run tools/setup_containers.sh (skips unless PALIGEMMA_REQUIRE_CONTAINERS is set)"
        if _required():
            pytest.fail(message)
        pytest.skip(message)
    stack = ComposeStack()
    try:
        stack.up()
        yield stack
    finally:
        left = stack.close()
        assert not left, f"left behind after docker compose down: {left}"


def detect(url: str, index: int) -> httpx.Response:
    png, _ = heldout_image(index)
    files = {"image": ("x.png", png, "image/png")}
    return httpx.post(f"{url}/detect", files=files, data={"objects": OBJECTS}, timeout=120)


def test_service_turns_healthy_through_its_healthcheck(stack: ComposeStack) -> None:
    assert stack.health == "healthy"
    assert state_health(stack.inspect("paligemma")) == "healthy"
    up, healthy, size = (stack.figures[k] for k in ("up", "healthy", "image"))
    print(f"\nup --build {up:.0f}s, healthy {healthy:.0f}s later, image {size / 1e9:.2f} GB")  # noqa: T201


def test_detect_through_published_port_matches_the_service_outside(stack: ComposeStack) -> None:
    inside = [detect(stack.url, i) for i in IMAGES]
    assert all(r.status_code == 200 for r in inside), [r.text[:300] for r in inside]
    # The same model and the same settings (the image's defaults), run as `make serve` runs it.
    with ServiceProcess(DEMO_MODEL, max_new_tokens=64) as outside:
        expected = [detect(outside.url, i).json() for i in IMAGES]
    assert [r.json()["text"] for r in inside] == [e["text"] for e in expected]
    assert [r.json()["detections"] for r in inside] == [e["detections"] for e in expected]
    assert any(e["detections"] for e in expected), "the demo model found nothing: the comparison proves little"


PROBE = """
import json, os
uids = {}
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\\0")
        status = open(f"/proc/{pid}/status").read()
    except OSError:
        continue
    if b"service" in cmd and any(part.endswith(b"python") for part in cmd):
        uids[pid] = int(next(l for l in status.splitlines() if l.startswith("Uid:")).split()[1])
writable = []
for where in ("/", "/app", "/app/models/demo", "/models", "/etc", "/usr", "/cache", "/tmp"):
    try:
        with open(os.path.join(where, ".probe"), "w") as f:
            f.write("x")
        os.remove(os.path.join(where, ".probe"))
        writable.append(where)
    except OSError:
        pass
print(json.dumps({"uids": list(uids.values()), "writable": writable}))
"""


def test_runs_as_uid_10001_and_writes_only_its_cache(stack: ComposeStack) -> None:
    out = stack.compose("exec", "-T", "paligemma", "python", "-c", PROBE).stdout
    probe = json.loads(out.strip().splitlines()[-1])
    assert probe["uids"] and set(probe["uids"]) == {10001}, probe
    assert probe["writable"] == ["/cache", "/tmp"], probe


def test_prometheus_scrapes_the_service(stack: ComposeStack) -> None:
    deadline, targets = time.monotonic() + 120, []
    while time.monotonic() < deadline:
        try:
            body = httpx.get(f"{stack.prometheus_url}/api/v1/targets", timeout=5).json()
            targets = [t for t in body["data"]["activeTargets"] if t["labels"]["job"] == "paligemma"]
            series = httpx.get(
                f"{stack.prometheus_url}/api/v1/query", params={"query": "paligemma_model_info"}, timeout=5
            ).json()["data"]["result"]
            if targets and all(t["health"] == "up" for t in targets) and series:
                assert series[0]["metric"]["engine"] == "transformers", series
                return
        except httpx.TransportError:
            pass
        time.sleep(2)
    raise AssertionError(f"no healthy paligemma target with a stored series: {targets}\n{stack.logs('prometheus')}")


def _half_sent(port: int, index: int) -> tuple[socket.socket, bytes]:
    """A /detect request whose headers and first half of the body are sent; returns the socket and the rest."""
    png, _ = heldout_image(index)
    request = httpx.Request(
        "POST",
        f"http://127.0.0.1:{port}/detect",
        files={"image": ("x.png", png, "image/png")},
        data={"objects": OBJECTS},
    )
    body = request.read()
    head = f"POST /detect HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
    head += f"Content-Type: {request.headers['content-type']}\r\nContent-Length: {len(body)}\r\n\r\n"
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    sock.sendall(head.encode() + body[: len(body) // 2])
    return sock, body[len(body) // 2 :]


def _answer(sock: socket.socket) -> tuple[int, dict[str, object]]:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_compose_down_drains_requests_in_flight_and_exits_0(stack: ComposeStack) -> None:
    expected = [detect(stack.url, i % len(IMAGES)).json()["text"] for i in range(HELD)]
    container, prometheus = stack.container("paligemma"), stack.container("prometheus")
    config = json.loads(stack.compose("config", "--format", "json").stdout)["services"]["paligemma"]
    grace = _seconds(config["stop_grace_period"])
    held = [_half_sent(stack.port, i % len(IMAGES)) for i in range(HELD)]
    deadline = time.monotonic() + 30
    while metric(stack.url, "paligemma_admitted_requests", 'state="running"') < HELD:
        assert time.monotonic() < deadline, "the held requests were never admitted"
        time.sleep(0.2)

    down: dict[str, float] = {}

    def compose_down() -> None:
        start = time.monotonic()
        stack.compose("down", "--volumes", timeout=grace + 120)
        down["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=compose_down)
    thread.start()
    deadline = time.monotonic() + 60
    while True:  # SIGTERM has arrived once readiness says 503 (the held requests keep the process alive)
        try:
            if httpx.get(f"{stack.url}/readyz", timeout=5).status_code == 503:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the service never started draining"
        time.sleep(0.2)
    refused = detect(stack.url, 0)
    for sock, rest in held:
        sock.sendall(rest)
    answers = [_answer(sock) for sock, _ in held]
    thread.join()

    assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining", refused.text
    assert [status for status, _ in answers] == [200] * HELD, answers
    assert [body["text"] for _, body in answers] == expected
    assert down["seconds"] < grace, f"docker compose down took {down['seconds']:.1f}s (grace {grace:g}s)"
    assert stack.exit_codes(container)[-1:] == [0], stack.exit_codes(container)
    assert stack.exit_codes(prometheus)[-1:] == [0], "Prometheus was killed instead of stopped"
    assert not stack.leftovers()
