"""The prefix-LM plugin (service/vllm_plugin): PaliGemma 2's shape, refusals, and no preemption.

PaliGemma 1's parity is in test_vllm_engine.py. Here: a PaliGemma-2-shaped tiny checkpoint (Gemma 2
text model: attention and final soft-capping, ``query_pre_attn_scalar`` 256 with head_dim 64,
alternating sliding-window and global layers) equals transformers token for token through the engine,
and stock vLLM does not; the engine refuses to start without the plugin or with settings that split a
prompt; and more requests than the KV cache holds are served without one preemption, each exactly as
when it runs alone, while vLLM's own scheduler preempts on the same load and changes the answers.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.engines.protocol import GenerationRequest
from tests.integration.cases import PROMPTS, images, prefix_lm_reference
from tests.integration.conftest import LoopThread, vllm_settings
from tests.integration.offline_vllm import run_offline

pytestmark = pytest.mark.vllm

KV_BYTES_PER_TOKEN = 2 * 2 * 1 * 64 * 4
"""Tiny model: 2 layers x (K, V) x 1 KV head x head_dim 64 x float32."""


@pytest.fixture(scope="module")
def pg2_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from paligemma.checkpoint import TinyConfig, build_tiny_checkpoint

    cfg = TinyConfig(init_std=0.3, text_model="gemma2")
    return build_tiny_checkpoint(tmp_path_factory.mktemp("pg2"), seed=0, cfg=cfg)


def _generate_all(loop: LoopThread, settings: Any, requests: list[GenerationRequest], solo: bool = False) -> Any:
    """Start the service's vLLM engine, run ``requests`` (all at once, or one at a time too), stop it."""
    from prometheus_client import REGISTRY

    from service.engines.vllm_engine import open_vllm_engine

    def preemptions() -> float:
        counters = (s for m in REGISTRY.collect() if m.name == "vllm:num_preemptions" for s in m.samples)
        return sum(s.value for s in counters if s.name.endswith("_total"))

    async def run() -> tuple[list[Any], list[Any], float]:
        async with open_vllm_engine(settings) as engine:
            together = list(await asyncio.gather(*(engine.generate(r) for r in requests)))
            alone = [await engine.generate(r) for r in requests] if solo else []
            return together, alone, preemptions()

    return loop.run(run(), timeout=600)


@pytest.fixture(scope="module")
def loop() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.close()


def test_paligemma2_shape_equals_transformers_and_stock_vllm_does_not(pg2_checkpoint: Path, loop: LoopThread) -> None:
    cases = [(p, im) for p in PROMPTS for im in images()]
    requests = [GenerationRequest(image=im, prefix=p, max_new_tokens=20) for p, im in cases]
    generations, _, _ = _generate_all(loop, vllm_settings(pg2_checkpoint, None), requests)
    reference = prefix_lm_reference(pg2_checkpoint, cases, 20)
    assert sum(len(set(g.token_ids)) > 4 for g in generations) >= 10  # the random model's output varies
    assert [list(g.token_ids) for g in generations] == reference
    stock = run_offline(pg2_checkpoint, "--stock")["ids"]
    assert sum(s == r for s, r in zip(stock, reference, strict=True)) <= 2


def _refusal(code: str, **env: str) -> str:
    """stderr of a fresh process that runs ``code`` and must fail with PrefixLMNotActiveError."""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=os.environ | env, check=False
    )
    assert result.returncode != 0
    assert "PrefixLMNotActiveError" in result.stderr, result.stderr[-3000:]
    return result.stderr


def test_engine_refuses_to_start_without_the_plugin(varied_checkpoint: Path) -> None:
    code = (
        "import asyncio\n"
        "from service.settings import Settings\n"
        "from service.engines.vllm_engine import open_vllm_engine\n"
        "async def main():\n"
        f"    async with open_vllm_engine(Settings(model={str(varied_checkpoint)!r}, engine='vllm')):\n"
        "        pass\n"
        "if __name__ == '__main__':\n"
        "    asyncio.run(main())\n"
    )
    stderr = _refusal(code, VLLM_PLUGINS="lora_filesystem_resolver")
    assert "has not loaded the 'paligemma_prefix_lm' plugin" in stderr


def test_settings_that_split_or_recompute_a_prompt_are_refused(varied_checkpoint: Path) -> None:
    from vllm.engine.arg_utils import EngineArgs

    from service.engines.vllm_plugin import SCHEDULER_CLASS, prefix_lm_problems

    def problems(**overrides: Any) -> list[str]:
        values: dict[str, Any] = {
            "model": str(varied_checkpoint),
            "max_model_len": 512,
            "enable_chunked_prefill": False,
            "enable_prefix_caching": False,
            "scheduler_cls": SCHEDULER_CLASS,
        }
        return prefix_lm_problems(EngineArgs(**(values | overrides)).create_engine_config())

    assert problems() == []
    assert any("chunked prefill" in p for p in problems(enable_chunked_prefill=True))
    assert any("prefix caching" in p for p in problems(enable_prefix_caching=True))
    assert any("scheduler_cls" in p for p in problems(scheduler_cls=None))


def test_more_requests_than_the_kv_cache_holds_are_never_preempted(varied_checkpoint: Path, loop: LoopThread) -> None:
    """KV cache for 3.5 sequences of max_model_len, 16 requests of ~270 tokens at once."""
    kv_bytes = int(3.5 * 512 * KV_BYTES_PER_TOKEN)
    settings = vllm_settings(varied_checkpoint, None, kv_cache_gib=kv_bytes / 2**30)
    pictures = images()
    requests = [GenerationRequest(image=pictures[i % 3], prefix=PROMPTS[i % 4], max_new_tokens=200) for i in range(16)]
    together, alone, preemptions = _generate_all(loop, settings, requests, solo=True)
    assert preemptions == 0
    assert sum(len(g.token_ids) for g in together) > 16 * 150  # the sequences did grow
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    # vLLM's own scheduler, same attention, same KV cache, same load: it preempts, and answers change.
    stock = run_offline(varied_checkpoint, f"--kv-cache-bytes={kv_bytes}", "--max-tokens=200", "--repeat=2")
    assert stock["preemptions"] > 0
    solo = {(r.prefix, id(r.image)): list(g.token_ids) for r, g in zip(requests, alone, strict=True)}
    expected = [solo[(p, id(im))] for p in PROMPTS for im in pictures] * 2  # offline_vllm's case order
    assert sum(s != e for s, e in zip(stock["ids"], expected, strict=True)) >= 1
