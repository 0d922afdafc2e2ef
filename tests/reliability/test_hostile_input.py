"""Hostile input against a real server: a clear 4xx (or a correct 200) for every case, never a 5xx,
never an internal detail in a body, and the server stays ready."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.reliability.corpus import Case, cases
from tests.reliability.server import LEAK, ServiceProcess

pytestmark = pytest.mark.slow
CASES = cases()


def five_xx(server: ServiceProcess) -> float:
    """Every 5xx the server has answered so far (other modules share it and cause deliberate 504s)."""
    text = httpx.get(f"{server.url}/metrics").text
    lines = [line for line in text.splitlines() if line.startswith("paligemma_http_requests_total{")]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if 'status="5' in line)


@pytest.fixture(scope="module")
def five_xx_before(server: ServiceProcess) -> float:
    return five_xx(server)


@pytest.fixture(scope="module")
def client(server: ServiceProcess, five_xx_before: float) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as http:
        yield http


def check_error_body(response: httpx.Response) -> None:
    assert LEAK.search(response.text) is None, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["code"] and error["message"], error
        assert error["request_id"] == response.headers["x-request-id"]


def test_corpus_is_big_enough() -> None:
    assert len(CASES) >= 25
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_case(client: httpx.Client, case: Case) -> None:
    response = client.post(
        case.path, files=case.files, data=case.data, json=case.json_body, content=case.content, headers=case.headers
    )
    assert response.status_code in case.expect, (response.status_code, response.text[:500])
    check_error_body(response)
    if response.status_code == 200 and case.check is not None:
        case.check(response.json())


def _raw_post(server: ServiceProcess, head: bytes, body_chunks: Iterator[bytes]) -> bytes:
    """Send a request by hand and read the reply (the server may answer before the body is all sent)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head)
        try:
            for chunk in body_chunks:
                sock.sendall(chunk)
        except OSError:  # answered and closed, or stopped reading: the reply is waiting
            pass
        received = b""
        try:
            while b"\r\n\r\n" not in received and (more := sock.recv(65536)):
                received += more
        except OSError:
            pass
        return received


def test_100_mb_body_with_length_is_413_before_reading(server: ServiceProcess) -> None:
    size = 100 * 1024 * 1024
    head = (
        f"POST /detect HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {size}\r\n\r\n"
    ).encode()
    reply = _raw_post(server, head, iter([b"{" + b" " * 65535]))
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert LEAK.search(reply.decode("latin-1")) is None


def test_100_mb_chunked_body_is_413(server: ServiceProcess) -> None:
    head = b"POST /ocr HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"a" * (1024 * 1024)
    frames = (b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(100))
    reply = _raw_post(server, head, frames)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]


def test_disconnect_mid_body_is_not_a_server_error(server: ServiceProcess) -> None:
    """Counted by the 5xx check below: a client that leaves mid-upload is a 499, not a 500."""
    for path in ("/ocr", "/detect"):
        ctype = "application/json" if path == "/ocr" else "multipart/form-data; boundary=b"
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\nContent-Length: 100000\r\n\r\n".encode()
            )
            sock.sendall(b"--b\r\n" + b"x" * 1000)
    deadline = time.monotonic() + 10
    while server.metric("paligemma_http_requests_total", 'endpoint="/detect",status="499"') < 1:
        assert time.monotonic() < deadline, "the disconnect was not recorded as 499"
        time.sleep(0.1)


def test_still_ready_and_no_5xx(server: ServiceProcess, five_xx_before: float) -> None:
    """Runs after the corpus (file order): the server is ready and answered no 5xx to any of it."""
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    assert five_xx(server) == five_xx_before


IMAGE_CASES = [c for c in CASES if c.files is not None and c.data == {"objects": "cat ; dog"} and not c.headers]
"""The cases about the image alone (the others are about form fields the chat route does not have)."""


@pytest.mark.parametrize("case", IMAGE_CASES, ids=[c.name for c in IMAGE_CASES])
def test_hostile_image_through_the_openai_route(client: httpx.Client, case: Case) -> None:
    """The same image bytes as a chat completion's data URL: the same checks, the same status."""
    import base64

    assert case.files is not None
    payload = case.files["image"][1]
    model = client.get("/v1/models").json()["data"][0]["id"]
    content = [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(payload).decode()}},
        {"type": "text", "text": "caption en"},
    ]
    response = client.post(
        "/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": content}]}
    )
    assert response.status_code in case.expect, (response.status_code, response.text[:500])
    assert LEAK.search(response.text) is None, response.text
    if response.status_code >= 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
