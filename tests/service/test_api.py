"""Every endpoint in multipart and JSON form, every error status, probes, metrics and OpenAPI.

All requests go through the real app with the real transformers engine on the tiny random checkpoint:
its text is garbage, so these tests check shapes, statuses and bookkeeping, not answers.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.api.routes import detection_grammar
from service.api.schemas import DetectResponse, TextResponse, VQAResponse
from service.app import create_app
from service.errors import ValidationFailed
from tests.service.conftest import image_bytes, make_settings

LEAKS = re.compile(r"Traceback|0x[0-9a-f]{6,}|/tmp/|site-packages|\.py\b")

CASES: list[tuple[str, dict[str, Any], type[Any]]] = [
    ("/detect", {"objects": "cat ; dog", "constrained": "false"}, DetectResponse),  # free: it runs to the limit
    ("/vqa", {"question": "what color is it?", "lang": "en"}, VQAResponse),
    ("/caption", {"lang": "en", "detail": "short"}, TextResponse),
    ("/caption", {"lang": "fr", "detail": "long"}, TextResponse),
    ("/ocr", {}, TextResponse),
]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def assert_error(response: Any, status: int, code: str | None = None) -> dict[str, str]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"code", "message", "request_id"}
    assert error["request_id"] == response.headers["x-request-id"]
    assert not LEAKS.search(response.text), response.text
    if code is not None:
        assert error["code"] == code
    return dict(error)


@pytest.mark.parametrize(("path", "fields", "model"), CASES)
def test_multipart(client: TestClient, png: bytes, path: str, fields: dict[str, Any], model: type[Any]) -> None:
    response = client.post(path, files={"image": ("x.png", png, "image/png")}, data=fields)
    assert response.status_code == 200, response.text
    result = model.model_validate(response.json())
    assert result.model == client.app.state.service.settings.served_model_name  # type: ignore[attr-defined]
    assert result.usage.completion_tokens == 6 and result.usage.prompt_tokens > 64
    assert result.latency_ms > 0


@pytest.mark.parametrize(("path", "fields", "model"), CASES)
def test_json(client: TestClient, png: bytes, path: str, fields: dict[str, Any], model: type[Any]) -> None:
    body = {"image": b64(png), **fields, "max_new_tokens": 3}
    if path == "/detect":
        body |= {"objects": ["cat", "dog"], "constrained": False}
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    assert model.model_validate(response.json()).usage.completion_tokens == 3


def test_detect_response_schema(client: TestClient) -> None:
    response = client.post(
        "/detect", files={"image": ("x.jpg", image_bytes((90, 30), fmt="JPEG"))}, data={"objects": ["cat", "dog"]}
    )  # repeated fields
    body = response.json()
    assert set(body) == {"detections", "image", "model", "text", "usage", "latency_ms"}
    assert body["image"] == {"width": 90, "height": 30}
    assert isinstance(body["detections"], list) and isinstance(body["text"], str)
    assert set(body["usage"]) == {"prompt_tokens", "completion_tokens"}


def test_vqa_and_text_fields(client: TestClient, png: bytes) -> None:
    vqa = client.post("/vqa", json={"image": f"data:image/png;base64,{b64(png)}", "question": "what is it?"}).json()
    assert set(vqa) == {"answer", "score", "model", "text", "usage", "latency_ms"}
    assert vqa["score"] is None or 0.0 <= vqa["score"] <= 1.0
    ocr = client.post("/ocr", json={"image": b64(png)}).json()
    assert set(ocr) == {"text", "score", "model", "usage", "latency_ms"}


# --- 400 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/detect", "/vqa", "/caption", "/ocr"])
def test_bad_image_is_400(client: TestClient, path: str) -> None:
    fields = {"/detect": {"objects": "cat"}, "/vqa": {"question": "why?"}}.get(path, {})
    assert_error(client.post(path, files={"image": ("x.png", b"not an image at all")}, data=fields), 400, "bad_image")
    assert_error(client.post(path, json={"image": b64(b"\x89PNG\r\n\x1a\n broken"), **fields}), 400, "bad_image")


def test_bad_base64_json_and_multipart_are_400(client: TestClient, png: bytes) -> None:
    assert_error(client.post("/ocr", json={"image": "***not base64***"}), 400, "bad_base64")
    assert_error(
        client.post("/ocr", content=b"{not json", headers={"content-type": "application/json"}), 400, "bad_json"
    )
    broken = b'--b\r\nContent-Disposition: form-data; name="image"\r\n\r\nabc'  # no closing boundary
    no_boundary = client.post("/ocr", content=broken, headers={"content-type": "multipart/form-data"})
    assert_error(no_boundary, 400, "bad_multipart")
    unterminated = client.post("/ocr", content=broken, headers={"content-type": "multipart/form-data; boundary=b"})
    assert_error(unterminated, 422)  # the parser keeps no half-received file part: the image is missing
    two_files = [("image", ("a.png", png)), ("image", ("b.png", png))]
    assert_error(client.post("/ocr", files=two_files), 400, "bad_multipart")
    assert_error(client.post("/ocr", files={"image": (None, "text, not a file")}), 400, "bad_field")
    assert_error(client.post("/ocr", files={"image": ("x.png", png), "other": ("o.png", png)}), 400)


def test_bad_content_length_is_400(client: TestClient) -> None:
    assert_error(
        client.post("/ocr", content=b"{}", headers={"content-length": "-5", "content-type": "application/json"}), 400
    )


# --- 413 ---------------------------------------------------------------------------------------


def test_too_large(client: TestClient) -> None:
    limit = client.app.state.service.settings.max_image_bytes  # type: ignore[attr-defined]
    big = b"\x00" * (limit + 1)
    assert_error(client.post("/ocr", files={"image": ("x.png", big)}), 413, "image_too_large")
    assert_error(client.post("/ocr", json={"image": b64(big)}), 413, "image_too_large")


def test_body_limit_counts_streamed_bytes(client: TestClient) -> None:
    limit = client.app.state.service.settings.max_body_bytes  # type: ignore[attr-defined]

    def chunks() -> Any:  # no Content-Length: only counting the received bytes can stop it
        for _ in range(limit // 65536 + 2):
            yield b"a" * 65536

    response = client.post("/ocr", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "too_large")
    declared = client.post(
        "/ocr", content=b"{}", headers={"content-length": str(limit + 1), "content-type": "application/json"}
    )
    assert_error(declared, 413, "too_large")


def test_pixel_bomb_is_413(client: TestClient) -> None:
    bomb = image_bytes((2500, 2000), mode="L")  # 5 MP > 4 MP limit, a few KB on the wire
    assert_error(client.post("/ocr", files={"image": ("x.png", bomb)}), 413, "image_too_large")


# --- 415 ---------------------------------------------------------------------------------------


def test_unsupported_media_types(client: TestClient) -> None:
    assert_error(
        client.post("/ocr", content=b"hello", headers={"content-type": "text/plain"}), 415, "unsupported_media_type"
    )
    assert_error(client.post("/ocr", data={"a": "b"}), 415)  # urlencoded form
    tiff = image_bytes(fmt="TIFF")
    assert_error(client.post("/ocr", files={"image": ("x.png", tiff, "image/png")}), 415, "unsupported_image_format")


# --- 422 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "fields", "code"),
    [
        ("/detect", {}, "validation_error"),
        ("/detect", {"objects": "cat", "max_new_tokens": "lots"}, "validation_error"),
        ("/detect", {"objects": "cat", "max_new_tokens": "0"}, "validation_error"),
        ("/detect", {"objects": "cat", "max_new_tokens": "65"}, "validation_error"),  # over the limit (64)
        ("/detect", {"objects": "<loc0001>"}, "bad_prompt"),
        ("/detect", {"objects": " ; "}, "bad_prompt"),
        ("/vqa", {}, "validation_error"),
        ("/vqa", {"question": "a\nb"}, "bad_prompt"),
        ("/vqa", {"question": "why?", "lang": "english please"}, "bad_prompt"),
        ("/caption", {"detail": "medium"}, "validation_error"),
        ("/ocr", {"unknown_field": "1"}, "validation_error"),
    ],
)
def test_validation_is_422(client: TestClient, png: bytes, path: str, fields: dict[str, str], code: str) -> None:
    assert_error(client.post(path, files={"image": ("x.png", png)}, data=fields), 422, code)


def test_missing_image_and_wrong_json_shapes_are_422(client: TestClient) -> None:
    no_image = assert_error(client.post("/detect", files={"objects": (None, "cat")}), 422, "validation_error")
    assert no_image["message"] == "image: Field required"
    assert_error(client.post("/ocr", json={}), 422, "validation_error")
    assert_error(client.post("/ocr", json=[1, 2]), 422)
    assert_error(client.post("/ocr", json={"image": 5}), 422)
    assert_error(client.post("/detect", json={"image": "aGk=", "objects": ["a;b"]}), 422, "bad_prompt")


def test_unknown_route_and_method(client: TestClient) -> None:
    assert_error(client.get("/nope"), 404, "not_found")
    assert_error(client.get("/detect"), 405, "method_not_allowed")


# --- 503, probes -------------------------------------------------------------------------------


def test_probes(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "model": None, "engine": None}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["engine"] == "transformers"


def test_not_ready_without_engine(tiny_checkpoint: Path, png: bytes) -> None:
    client = TestClient(create_app(make_settings(tiny_checkpoint)))  # no `with`: the lifespan never ran
    assert client.get("/healthz").status_code == 200
    assert_error(client.get("/readyz"), 503, "not_ready")
    response = client.post("/ocr", files={"image": ("x.png", png)})
    assert_error(response, 503, "not_ready")
    assert response.headers["retry-after"]


def test_closed_engine_is_503(tiny_checkpoint: Path, png: bytes) -> None:
    with TestClient(create_app(make_settings(tiny_checkpoint))) as client:
        engine = client.app.state.service.engine  # type: ignore[attr-defined]
        client.portal.call(engine.aclose)  # type: ignore[union-attr]
        assert_error(client.get("/readyz"), 503, "engine_unavailable")
        assert_error(client.post("/ocr", files={"image": ("x.png", png)}), 503, "engine_unavailable")


def test_overloaded_engine_is_503(tiny_checkpoint: Path, png: bytes) -> None:
    from concurrent.futures import ThreadPoolExecutor

    settings = make_settings(tiny_checkpoint, max_batch_size=1, max_queue_size=1, batch_window_ms=0)
    with TestClient(create_app(settings)) as client, ThreadPoolExecutor(12) as pool:
        responses = list(
            pool.map(
                lambda _: client.post("/ocr", files={"image": ("x.png", png)}, data={"max_new_tokens": "48"}), range(12)
            )
        )
        statuses = sorted(r.status_code for r in responses)
        assert 200 in statuses and 503 in statuses, statuses
        rejected = next(r for r in responses if r.status_code == 503)
        assert_error(rejected, 503, "overloaded")
        assert rejected.headers["retry-after"] == "1"
        assert client.post("/ocr", files={"image": ("x.png", png)}).status_code == 200  # still serving


# --- metrics and docs --------------------------------------------------------------------------

METRIC_NAMES = [
    "paligemma_http_requests_total",
    "paligemma_http_request_duration_seconds_bucket",
    "paligemma_engine_queue_depth",
    "paligemma_engine_requests_in_flight",
    "paligemma_engine_batch_size_bucket",
    "paligemma_generated_tokens_total",
    "paligemma_prompt_tokens_total",
    "paligemma_image_decode_seconds_bucket",
    "paligemma_detections_per_request_bucket",
    "paligemma_detections_dropped_total",
    "paligemma_model_info",
]


def test_metrics(client: TestClient, png: bytes) -> None:
    client.post("/detect", files={"image": ("x.png", png)}, data={"objects": "cat"})
    client.post("/ocr", content=b"x", headers={"content-type": "text/plain"})
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name in METRIC_NAMES:
        assert re.search(rf"^{name}[{{ ]", text, re.M), name
    assert 'paligemma_http_requests_total{endpoint="/detect",status="200"}' in text
    assert 'paligemma_http_requests_total{endpoint="/ocr",status="415"}' in text
    assert 'paligemma_http_request_duration_seconds_bucket{endpoint="/detect",le="60.0"}' in text
    assert re.search(r'^paligemma_generated_tokens_total\{endpoint="/detect"\} [1-9]', text, re.M)
    assert "python_info" in text or "process_" in text  # prometheus_client's default REGISTRY, same response
    ours = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line.startswith("paligemma")}
    assert not any("vllm" in name for name in ours)


def test_metrics_labels_are_bounded(client: TestClient) -> None:
    client.get("/secret-user-path-12345")
    assert "secret-user-path" not in client.get("/metrics").text


def test_openapi_documents_both_body_types_with_examples(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path in ("/detect", "/vqa", "/caption", "/ocr"):
        content = spec["paths"][path]["post"]["requestBody"]["content"]
        assert content["multipart/form-data"]["schema"]["properties"]["image"]["format"] == "binary"
        assert content["application/json"]["schema"]["examples"]
        assert {"400", "413", "415", "422", "503"} <= set(spec["paths"][path]["post"]["responses"])
    assert "examples" in spec["components"]["schemas"]["DetectResponse"]
    assert client.get("/docs").status_code == 200


def test_openapi_references_all_resolve(client: TestClient) -> None:
    """Every ``$ref`` names something in the document (a body schema's own ``#/$defs/...`` would not: it
    resolves against the document's root, and Schemathesis then skips that part of the body)."""
    spec = client.get("/openapi.json").json()

    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
            return own + [r for value in node.values() for r in refs(value)]
        return [r for item in node for r in refs(item)] if isinstance(node, list) else []

    found = refs(spec)
    assert found  # the responses point into components/schemas
    for ref in found:
        target: Any = spec
        for part in ref.removeprefix("#/").split("/"):
            assert isinstance(target, dict) and part in target, f"unresolvable {ref}"
            target = target[part]
    chat = spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "ImageURL" in json.dumps(chat)  # the image part is written in place


def test_detection_grammars_are_built_once_per_label_set(client: TestClient) -> None:
    """Cached per app by labels and limits (tokenizing labels on the event loop was a fifth of a /detect
    request's work there); a label that cannot be a grammar is refused every time, not cached."""
    state = client.app.state.service  # type: ignore[attr-defined]
    engine = state.engine
    first = detection_grammar(state, engine, ["cat", "dog"], False, 25, 40)
    assert detection_grammar(state, engine, ["cat", "dog"], False, 25, 40) is first
    assert detection_grammar(state, engine, ["cat", "dog"], False, 25, 41) is not first  # another token limit
    assert detection_grammar(state, engine, ["dog", "cat"], False, 25, 40).continued == first.continued[::-1]
    eos = state.engine.tokenizer().eos_token
    for _ in range(2):
        with pytest.raises(ValidationFailed, match="end token"):
            detection_grammar(state, engine, [f"cat{eos}"], False, 25, 40)


def test_detect_follows_the_grammar_by_default(client: TestClient, png: bytes) -> None:
    """On the tiny random model, which writes only newlines when free: the grammar makes it answer whole
    objects with requested labels, every box in the text a detection."""

    def detect(**fields: str) -> dict[str, Any]:
        data = {"objects": "cat ; dog", "max_new_tokens": "40", **fields}
        response = client.post("/detect", files={"image": ("x.png", png, "image/png")}, data=data)
        assert response.status_code == 200, response.text
        return dict(response.json())

    free, constrained, one = detect(constrained="false"), detect(), detect(max_objects="1")
    assert free["detections"] == [] and free["usage"]["completion_tokens"] == 40  # free, it writes "\n" x 40
    for body, most in ((constrained, 40), (one, 1)):
        assert 1 <= len(body["detections"]) == body["text"].count("<loc") // 4 <= most
        assert {d["label"] for d in body["detections"]} <= {"cat", "dog"}
    response = client.post(
        "/detect", files={"image": ("x.png", png, "image/png")}, data={"objects": "cat", "max_objects": "0"}
    )
    assert_error(response, 422, "validation_error")


def test_each_upload_is_named_by_a_digest_of_its_bytes(client: TestClient, png: bytes, monkeypatch: Any) -> None:
    """The id engines may key image caches by (vLLM's processor cache): the same bytes, multipart or base64,
    give the same id; other bytes another."""
    engine = client.app.state.service.engine  # type: ignore[attr-defined]
    real, seen = engine.generate, []

    async def recording(request: Any) -> Any:
        seen.append(request.image_id)
        return await real(request)

    monkeypatch.setattr(engine, "generate", recording)
    jpeg = image_bytes(fmt="JPEG")
    for data, media in ((png, "image/png"), (png, "image/png"), (jpeg, "image/jpeg")):
        response = client.post("/vqa", files={"image": ("x", data, media)}, data={"question": "what?"})
        assert response.status_code == 200, response.text
    assert client.post("/vqa", json={"image": b64(png), "question": "what?"}).status_code == 200
    digest = {data: hashlib.sha256(data).hexdigest() for data in (png, jpeg)}
    assert seen == [digest[png], digest[png], digest[jpeg], digest[png]]
