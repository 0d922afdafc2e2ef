"""Over HTTP, on the trained demo model: vLLM's /detect answers are the transformers engine's.

Two real servers on loopback in this process, one per engine, and 100 held-out images of the demo's
own held-out set (tests/demo_model.py). Then a LoRA adapter on the demo model: selected per request on
vLLM, against the transformers engine serving the merged checkpoint (``python -m finetune merge``).
Before the prefix-LM plugin, vLLM-CPU's texts matched on 0-8 of 100 images (docs/engines.md).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.app import create_app
from service.settings import Settings
from tests.demo_model import heldout_image
from tests.integration.conftest import random_lora, vllm_settings
from tests.integration.test_vllm_service import _Server
from tests.photos import PHOTOS, photo

pytestmark = pytest.mark.vllm

IMAGES = 100
OBJECTS = "circle ; square ; triangle"
PHOTO_ANSWERS = Path(__file__).parent / "fixtures" / "photo_answers.json"
"""/detect and chat texts on photos, recorded on the code before issue 36 (PALIGEMMA_RECORD_PHOTO_ANSWERS=1)."""


@pytest.fixture(scope="module")
def demo_adapter(demo_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random LoRA on the demo model's language model: it changes the boxes but keeps them boxes."""
    return random_lora(demo_checkpoint, tmp_path_factory.mktemp("demo-adapter"), std=0.02, seed=3)


@pytest.fixture(scope="module")
def merged(demo_adapter: Path, demo_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from finetune.config import MergeConfig
    from finetune.training.merge import merge

    out = tmp_path_factory.mktemp("demo-merged")
    return merge(MergeConfig(run=str(demo_adapter), out=str(out), dtype="float32", base=str(demo_checkpoint)))


@pytest.fixture(scope="module")
def servers(demo_checkpoint: Path, merged: Path, demo_adapter: Path) -> Iterator[dict[str, _Server]]:
    def transformers(model: Path) -> Any:
        return create_app(Settings(model=str(model), engine="transformers", max_batch_size=16))  # type: ignore[call-arg]

    vllm = create_app(vllm_settings(demo_checkpoint, demo_adapter, max_new_tokens=64))
    with (
        _Server(transformers(demo_checkpoint)) as base,
        _Server(transformers(merged)) as merged_server,
        _Server(vllm) as vllm_server,
    ):
        yield {"transformers": base, "merged": merged_server, "vllm": vllm_server}


def _texts(server: _Server, adapter: str | None = None) -> list[str]:
    """/detect texts for the first ``IMAGES`` held-out images, 16 requests in flight."""
    gate = asyncio.Semaphore(16)

    async def one(client: httpx.AsyncClient, index: int) -> str:
        png, _ = heldout_image(index)
        fields = {"objects": OBJECTS, "max_new_tokens": "64"} | ({"adapter": adapter} if adapter else {})
        async with gate:
            response = await client.post("/detect", files={"image": ("x.png", png, "image/png")}, data=fields)
        assert response.status_code == 200, response.text
        return str(response.json()["text"])

    async def run() -> list[str]:
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
            return list(await asyncio.gather(*(one(client, i) for i in range(IMAGES))))

    return asyncio.run(run())


def test_vllm_detect_texts_equal_the_transformers_engine(servers: dict[str, _Server]) -> None:
    reference, served = _texts(servers["transformers"]), _texts(servers["vllm"])
    assert sum("<loc" in t for t in reference) >= 90  # the demo model really detects
    assert sum(a == b for a, b in zip(reference, served, strict=True)) >= 99


def test_lora_per_request_equals_the_merged_checkpoint(servers: dict[str, _Server]) -> None:
    merged, adapted = _texts(servers["merged"]), _texts(servers["vllm"], adapter="shapes")
    base = _texts(servers["vllm"])
    assert sum("<loc" in t for t in merged) >= 50
    assert sum(a != b for a, b in zip(base, adapted, strict=True)) >= 20  # the adapter changes the answers
    assert sum(a == b for a, b in zip(merged, adapted, strict=True)) >= 99


def _photo_answers(server: _Server) -> dict[str, dict[str, str]]:
    """Per photo: the /detect text (multipart) and the chat completion's text (a data URL, openai client)."""
    from openai import OpenAI

    chat = OpenAI(base_url=f"{server.url}/v1", api_key="none", timeout=300)
    answers = {}
    for name in PHOTOS:
        files = {"image": (f"{name}.jpg", photo(name), "image/jpeg")}
        response = httpx.post(f"{server.url}/detect", files=files, data={"objects": OBJECTS}, timeout=300)
        assert response.status_code == 200, response.text
        url = "data:image/jpeg;base64," + base64.b64encode(photo(name)).decode()
        completion = chat.chat.completions.create(
            model=server.engine.model_name,
            temperature=0,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": url}},
                        {"type": "text", "text": f"detect {OBJECTS}"},
                    ],
                }
            ],
        )
        answers[name] = {"detect": response.json()["text"], "chat": completion.choices[0].message.content or ""}
    return answers


def test_photos_answer_as_before_the_early_resize(servers: dict[str, _Server]) -> None:
    """Photo-sized JPEGs (EXIF-rotated too) give, on both engines, the texts recorded before uploads were
    resized to the model's input at intake: the model sees the same pixels."""
    answers = {engine: _photo_answers(servers[engine]) for engine in ("transformers", "vllm")}
    if os.environ.get("PALIGEMMA_RECORD_PHOTO_ANSWERS") == "1":
        PHOTO_ANSWERS.parent.mkdir(exist_ok=True)
        PHOTO_ANSWERS.write_text(json.dumps(answers, indent=1) + "\n")
    recorded = json.loads(PHOTO_ANSWERS.read_text())
    assert sum("<loc" in a["detect"] for a in recorded["transformers"].values()) >= 4  # it really detects
    assert answers == recorded
