"""The OpenAI-compatible routes, called with the official ``openai`` client against a real server.

A real ``python -m service`` process on the shipped demo model (transformers engine), an API key set:
the chat answers for detect, caption and VQA equal the task endpoints' answers for the same image;
streaming; the documented 4xx, in OpenAI's error shape, for what PaliGemma cannot do; and CORS.
The adapter selected through ``model`` on the vLLM engine is in tests/integration/test_vllm_service.py.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.demo_model import heldout_image
from tests.reliability.server import ServiceProcess

KEY = "test-key-openai"
ORIGIN = "https://app.example.com"


@pytest.fixture(scope="module")
def server(demo_checkpoint: Path) -> Iterator[ServiceProcess]:
    with ServiceProcess(
        demo_checkpoint, api_keys=KEY, cors_origins=ORIGIN, max_new_tokens=64, model_name="demo"
    ) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: ServiceProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _ask(client: openai.OpenAI, png: bytes, text: str, **kwargs: Any) -> Any:
    content = [{"type": "image_url", "image_url": {"url": _data_url(png)}}, {"type": "text", "text": text}]
    return client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": content}], temperature=0, **kwargs
    )


def _task(server: ServiceProcess, path: str, png: bytes, **fields: str) -> dict[str, Any]:
    response = httpx.post(
        server.url + path,
        files={"image": ("x.png", png, "image/png")},
        data=fields,
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["demo"]


def test_chat_answers_equal_the_task_endpoints(client: openai.OpenAI, server: ServiceProcess) -> None:
    png, shapes = heldout_image(6)
    detect = _ask(client, png, "detect circle ; square ; triangle", logprobs=True, top_logprobs=1)
    reference = _task(server, "/detect", png, objects="circle ; square ; triangle")
    choice = detect.choices[0]
    assert choice.message.content == reference["text"] and "<loc" in reference["text"]
    assert choice.finish_reason == "stop"
    assert detect.model_extra["detections"] == reference["detections"]
    assert len(detect.model_extra["detections"]) == len(shapes)
    assert detect.usage.completion_tokens == reference["usage"]["completion_tokens"]
    assert [t.logprob <= 0 for t in choice.logprobs.content] == [True] * detect.usage.completion_tokens
    caption = _ask(client, png, "caption en")
    assert caption.choices[0].message.content == _task(server, "/caption", png, lang="en")["text"]
    question = "how many circles are there?"
    vqa = _ask(client, png, f"answer en {question}")
    assert vqa.choices[0].message.content == _task(server, "/vqa", png, question=question)["answer"]
    assert _ask(client, png, question).choices[0].message.content == vqa.choices[0].message.content  # plain text


def test_streaming_ends_with_the_whole_answer(client: openai.OpenAI, server: ServiceProcess) -> None:
    png, _ = heldout_image(6)
    stream = _ask(client, png, "detect circle ; square ; triangle", stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == _task(server, "/detect", png, objects="circle ; square ; triangle")["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def _error(call: Any) -> tuple[int, dict[str, Any]]:
    with pytest.raises(openai.APIStatusError) as info:
        call()
    body = info.value.body
    assert isinstance(body, dict) and set(body) == {"message", "type", "param", "code"}, body
    return info.value.status_code, body


def test_what_paligemma_cannot_do_gets_a_4xx_in_openai_shape(client: openai.OpenAI, server: ServiceProcess) -> None:
    png, _ = heldout_image(0)
    image = {"type": "image_url", "image_url": {"url": _data_url(png)}}
    text = {"type": "text", "text": "caption en"}

    def chat(content: list[dict[str, Any]], **kwargs: Any) -> Any:
        values = {"model": "demo", "messages": [{"role": "user", "content": content}]} | kwargs
        return lambda: client.chat.completions.create(**values)

    url = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    bad = {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@not-base64@@@"}}
    cases = [
        (chat([url, text]), 400, "image_url_not_supported"),
        (chat([bad, text]), 400, "bad_base64"),
        (chat([image, image, text]), 400, "unsupported_content"),
        (chat([image, text], temperature=1), 400, "unsupported_value"),
        (chat([image, text], model="gpt-4o"), 404, "model_not_found"),
    ]
    for call, status, code in cases:
        got_status, body = _error(call)
        assert (got_status, body["code"]) == (status, code), body
    status, body = _error(chat([image, text], temperature=1))
    assert body["param"] == "temperature" and body["type"] == "invalid_request_error"
    keyless = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    status, body = _error(lambda: keyless.models.list())
    assert (status, body["code"]) == (401, "unauthorized")


def test_cors_preflight_allows_the_listed_origin_only(server: ServiceProcess) -> None:
    def preflight(origin: str) -> httpx.Response:
        headers = {
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        }
        return httpx.options(f"{server.url}/v1/chat/completions", headers=headers, timeout=10)

    allowed = preflight(ORIGIN)
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-credentials" not in allowed.headers
    refused = preflight("https://evil.example.com")
    assert "access-control-allow-origin" not in refused.headers
    actual = httpx.get(f"{server.url}/v1/models", headers={"Origin": ORIGIN, "Authorization": f"Bearer {KEY}"})
    assert actual.headers["access-control-allow-origin"] == ORIGIN
