"""``GET /examples`` and its files: the committed pictures are the held-out images they claim to be, only listed
files are served, and with API keys set the page and its examples stay open while inference does not."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from tests.service.conftest import make_settings


def test_examples_are_listed_with_urls(client: TestClient) -> None:
    response = client.get("/examples")
    assert response.status_code == 200
    examples = response.json()["examples"]
    assert len(examples) >= 3
    for example in examples:
        assert example["url"] == f"/examples/{example['file']}"
        assert example["task"] in ("detect", "segment") and example["objects"]
    assert any("diamond" in e["objects"] for e in examples)  # the one that needs the adapter


def test_each_example_is_the_held_out_image_it_names(client: TestClient) -> None:
    from finetune.data.synth import render

    for example in client.get("/examples").json()["examples"]:
        response = client.get(example["url"])
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        source = example["source"]
        expected, _ = render(source["seed"], source["index"], shapes=tuple(source["shapes"]))
        served = Image.open(io.BytesIO(response.content))
        np.testing.assert_array_equal(np.asarray(served.convert("RGB")), np.asarray(expected))


@pytest.mark.parametrize("name", ["nope.png", "examples.json", "..%2F..%2Fapp.py", "%2E%2E"])
def test_only_listed_files_are_served(client: TestClient, name: str) -> None:
    response = client.get(f"/examples/{name}")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_with_api_keys_the_page_and_examples_stay_open(tiny_checkpoint: Path) -> None:
    settings = make_settings(tiny_checkpoint, api_keys="secret")
    with TestClient(create_app(settings)) as locked:
        assert locked.get("/").status_code == 200
        assert locked.get("/examples").status_code == 200
        first = locked.get("/examples").json()["examples"][0]["url"]
        assert locked.get(first).status_code == 200
        assert locked.get("/v1/models").status_code == 401
        assert locked.get("/v1/models", headers={"Authorization": "Bearer secret"}).status_code == 200
