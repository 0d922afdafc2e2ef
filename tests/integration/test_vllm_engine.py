"""The vLLM engine for real on CPU: plumbing parity with transformers, batching, aborts, LoRA."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from service.engine import GenerationRequest, UnknownAdapterError

pytestmark = pytest.mark.vllm

PROMPTS = ["detect red circle", "detect square ; triangle", "caption en", "answer en how many shapes are there?"]


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 255, (90, 160, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 255, (200, 120, 3), dtype=np.uint8)),
        Image.new("RGB", (64, 64), (30, 200, 90)),
    ]


def _causal_reference(checkpoint: Path, prefix: str, image: Image.Image, n: int) -> list[int]:
    """transformers greedy ids attending causally over every token, as vLLM's CPU backend does.

    Eager attention and no ``token_type_ids``: with SDPA, transformers 5.19 treats a PaliGemma prompt
    without ``token_type_ids`` as one bidirectional block, so only eager gives the fully causal pattern.
    """
    from transformers import AutoProcessor, PaliGemmaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(checkpoint)
    model = PaliGemmaForConditionalGeneration.from_pretrained(checkpoint, attn_implementation="eager").eval()
    batch = processor(images=image, text="<image>" + prefix, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            max_new_tokens=n,
            do_sample=False,
        )
    return [int(t) for t in out[0, batch["input_ids"].shape[1] :] if int(t) != processor.tokenizer.eos_token_id]


def test_greedy_ids_equal_the_causal_transformers_reference(
    vllm_engine: Any, engine_loop: Any, varied_checkpoint: Path
) -> None:
    requests = [GenerationRequest(image=im, prefix=p, max_new_tokens=20) for p in PROMPTS for im in _images()]

    async def run_all() -> list[Any]:
        return list(await asyncio.gather(*(vllm_engine.generate(r) for r in requests)))

    generations = engine_loop.run(run_all())
    for request, generation in zip(requests, generations, strict=True):
        reference = _causal_reference(varied_checkpoint, request.prefix, request.image, 20)
        assert len(generation.token_ids) >= 16
        assert len(set(generation.token_ids)) > 4  # varied output, not one token repeated
        assert list(generation.token_ids[:16]) == reference[:16], request.prefix
        assert len(generation.logprobs) == len(generation.token_ids)
        assert all(lp <= 0.0 for lp in generation.logprobs)


def test_sixteen_concurrent_requests_all_succeed(vllm_engine: Any, engine_loop: Any) -> None:
    images = _images()
    requests = [GenerationRequest(image=images[i % 3], prefix=PROMPTS[i % 4], max_new_tokens=8) for i in range(16)]

    async def run_all() -> list[Any]:
        return list(await asyncio.gather(*(vllm_engine.generate(r) for r in requests)))

    generations = engine_loop.run(run_all())
    assert len(generations) == 16
    assert all(g.completion_tokens == 8 and g.finish_reason == "length" for g in generations)
    assert vllm_engine.stats()["engine_unfinished"] == 0


def test_cancelling_aborts_the_engine_request(vllm_engine: Any, engine_loop: Any) -> None:
    request = GenerationRequest(image=_images()[0], prefix="caption en", max_new_tokens=400)

    async def start_then_cancel() -> tuple[float, float]:
        task = asyncio.create_task(vllm_engine.generate(request))
        for _ in range(200):  # wait until vLLM holds the request
            await asyncio.sleep(0.02)
            if vllm_engine.stats()["engine_unfinished"] >= 1:
                break
        during = vllm_engine.stats()["engine_unfinished"]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            await asyncio.sleep(0.05)
            if vllm_engine.stats()["engine_unfinished"] == 0:
                break
        return during, vllm_engine.stats()["engine_unfinished"]

    during, after = engine_loop.run(start_then_cancel())
    assert during == 1
    assert after == 0


def test_lora_adapter_changes_the_output(vllm_engine: Any, engine_loop: Any) -> None:
    image = _images()[0]
    base = engine_loop.run(vllm_engine.generate(GenerationRequest(image=image, prefix="caption en", max_new_tokens=12)))
    adapted = engine_loop.run(
        vllm_engine.generate(GenerationRequest(image=image, prefix="caption en", max_new_tokens=12, adapter="shapes"))
    )
    assert adapted.token_ids != base.token_ids
    with pytest.raises(UnknownAdapterError):
        engine_loop.run(vllm_engine.generate(GenerationRequest(image=image, prefix="ocr", adapter="nope")))
