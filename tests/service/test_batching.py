"""The transformers engine: dynamic batching proven by counting generate calls, logprobs checked against
a forward pass, batched rows equal to single runs, and queued requests that can be cancelled."""

from __future__ import annotations

import asyncio
import base64
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from service.engines.hf_engine import open_hf_engine
from service.engines.protocol import Generation, GenerationRequest, UnknownAdapterError
from tests.service.conftest import make_settings


def _batch_sizes(metrics_text: str) -> tuple[float, float]:
    values = {}
    for line in metrics_text.splitlines():
        if line.startswith(("paligemma_engine_batch_size_count", "paligemma_engine_batch_size_sum")):
            name, value = line.split()
            values[name] = float(value)
    return values["paligemma_engine_batch_size_count"], values["paligemma_engine_batch_size_sum"]


def test_sixteen_concurrent_http_requests_share_generate_calls(client: TestClient, png: bytes) -> None:
    engine = client.app.state.service.engine  # type: ignore[attr-defined]
    calls_before = engine.stats()["generate_calls"]
    count_before, sum_before = _batch_sizes(client.get("/metrics").text)

    def post(i: int) -> httpx.Response:
        if i % 2:
            return client.post("/detect", files={"image": ("x.png", png)}, data={"objects": f"cat ; dog{i}"})
        return client.post("/vqa", json={"image": base64.b64encode(png).decode(), "question": "why?"})

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(post, range(16)))
    assert [r.status_code for r in responses] == [200] * 16
    calls = engine.stats()["generate_calls"] - calls_before
    assert 1 <= calls < 16, f"16 requests took {calls} generate calls"
    count_after, sum_after = _batch_sizes(client.get("/metrics").text)
    assert count_after - count_before == calls
    assert sum_after - sum_before == 16  # every request ran in exactly one batch


def _image(seed: int) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(40 + seed, 56, 3, generator=generator) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def test_batched_rows_match_single_runs_and_logprobs_match_a_forward_pass(varied_checkpoint: Path) -> None:
    """Padding must not change a row's greedy tokens, and each logprob is log p(chosen | prefix)."""
    settings = make_settings(varied_checkpoint, max_batch_size=4, batch_window_ms=200)
    requests = [
        GenerationRequest(_image(0), "caption en", max_new_tokens=6),
        GenerationRequest(_image(1), "detect cat ; dog ; red circle", max_new_tokens=9),
        GenerationRequest(_image(2), "answer en what color is the big square on the left", max_new_tokens=4),
    ]

    async def run() -> tuple[list[Generation], list[Generation]]:
        async with open_hf_engine(settings) as engine:
            batched = await asyncio.gather(*(engine.generate(r) for r in requests))
            assert engine.stats()["generate_calls"] == 1
            single = [await engine.generate(r) for r in requests]
            return list(batched), single

    batched, single = asyncio.run(run())
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    assert len({g.token_ids for g in batched}) > 1  # the varied checkpoint gives different outputs
    for request, row, alone in zip(requests, batched, single, strict=True):
        assert len(row.token_ids) == len(row.logprobs) <= request.max_new_tokens
        assert row.finish_reason in ("stop", "length")
        assert row.logprobs == pytest.approx(alone.logprobs, abs=1e-3)

    from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor

    processor = PaliGemmaProcessor.from_pretrained(varied_checkpoint)
    model = PaliGemmaForConditionalGeneration.from_pretrained(varied_checkpoint, dtype=torch.float32).eval()
    request, generation = requests[1], single[1]
    inputs = processor(text="<image>" + request.prefix, images=request.image, return_tensors="pt")
    generated = torch.tensor([generation.token_ids])
    n_prompt = inputs["input_ids"].shape[1]
    with torch.inference_mode():
        logits = model(
            input_ids=torch.cat([inputs["input_ids"], generated], dim=1),
            pixel_values=inputs["pixel_values"],
            attention_mask=torch.ones(1, n_prompt + generated.shape[1], dtype=torch.long),
            token_type_ids=torch.cat([inputs["token_type_ids"], torch.ones_like(generated)], dim=1),
        ).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    for step, token in enumerate(generation.token_ids):
        expected = logprobs[n_prompt - 1 + step, token].item()
        assert generation.logprobs[step] == pytest.approx(expected, abs=1e-3)
        assert token == int(logprobs[n_prompt - 1 + step].argmax())  # greedy


def test_queued_request_can_be_cancelled_and_adapters_are_refused(tiny_checkpoint: Path) -> None:
    settings = make_settings(tiny_checkpoint, max_batch_size=1, batch_window_ms=0)
    image = Image.new("RGB", (32, 32), "blue")

    async def run() -> None:
        async with open_hf_engine(settings) as engine:
            first = asyncio.create_task(engine.generate(GenerationRequest(image, "ocr", max_new_tokens=40)))
            await asyncio.sleep(0)
            queued = asyncio.create_task(engine.generate(GenerationRequest(image, "ocr", max_new_tokens=40)))
            await asyncio.sleep(0.01)
            assert engine.stats()["queue_depth"] + engine.stats()["in_flight"] == 2
            queued.cancel()
            with pytest.raises(asyncio.CancelledError):
                await queued
            assert engine.stats()["queue_depth"] == 0
            assert (await first).completion_tokens == 40
            assert engine.stats()["generate_calls"] == 1  # the cancelled request never ran
            with pytest.raises(UnknownAdapterError):
                await engine.generate(GenerationRequest(image, "ocr", adapter="nope"))
            await engine.check_health()
        with pytest.raises(Exception, match="not running"):
            await engine.check_health()

    asyncio.run(run())


def test_finish_reason_and_length(client: TestClient) -> None:
    engine = client.app.state.service.engine  # type: ignore[attr-defined]
    generation = client.portal.call(  # type: ignore[union-attr]
        engine.generate, GenerationRequest(Image.new("RGB", (20, 20)), "caption en", max_new_tokens=5)
    )
    assert generation.finish_reason in ("stop", "length")
    if generation.finish_reason == "length":
        assert generation.completion_tokens == 5
    assert all(lp <= 0 and not math.isnan(lp) for lp in generation.logprobs)


@pytest.mark.parametrize("segment", [False, True])
def test_constrained_answers_parse_completely_and_label_sets_do_not_leak(
    varied_checkpoint: Path, segment: bool
) -> None:
    """The random model writes garbage freely; under the grammar every answer is whole, in one batch."""
    from tests.grammar_answers import check_complete, constrained_requests, dropped

    settings = make_settings(varied_checkpoint, max_batch_size=16, batch_window_ms=200)

    async def run() -> tuple[list[Any], list[Generation], list[Generation], float]:
        async with open_hf_engine(settings) as engine:
            cases = constrained_requests(engine.tokenizer(), [_image(i) for i in range(3)], 60, segment)
            constrained = await asyncio.gather(*(engine.generate(r) for _, r in cases))
            free = await asyncio.gather(*(engine.generate(replace(r, grammar=None)) for _, r in cases))
            return cases, list(constrained), list(free), engine.stats()["generate_calls"]

    cases, constrained, free, calls = asyncio.run(run())
    assert calls == 2  # each set of 12 requests ran as one batch, label sets side by side
    from transformers import PaliGemmaProcessor

    tokenizer = PaliGemmaProcessor.from_pretrained(varied_checkpoint).tokenizer
    objects = [check_complete(g, labels, tokenizer, segment) for (labels, _), g in zip(cases, constrained, strict=True)]
    assert sum(objects) >= 6  # boxes were written, not just <eos>
    assert sum(dropped(g, labels, tokenizer) for (labels, _), g in zip(cases, free, strict=True)) > 0
