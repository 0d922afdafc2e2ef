"""PaliGemma 2 served as big_vision trained it: every text layer global, in both engines.

At 896 px a PaliGemma 2 prompt (4,096 image tokens + prefix) is longer than Gemma 2's sliding window
(4,096). big_vision has no sliding window; transformers and vLLM would each band it differently. Here the
same situation, small: a tiny Gemma 2 checkpoint whose window (16) is far shorter than its prompt (64
image tokens + ``<bos>`` + prefix + ``"\\n"``, 68 to 75 tokens) and its 16 new tokens. By default both
engines give the same greedy ids as the same weights with a window longer than any sequence; with
``keep_sliding_window`` each engine bands attention again and the ids change (so the window is really in
play, and the default is what removes it).

The transformers side is the service's own ``load_model`` and ``HFEngine``, with eager attention: Gemma 2
soft-caps attention logits (50), which vLLM and transformers' eager attention apply and its SDPA
attention (the engine's default) does not; the random weights here (std 0.3) make that difference show.
Two vLLM starts in all (~35 s each on 2 cores).
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from service.engines.protocol import GenerationRequest
from tests.integration.cases import PROMPTS, images
from tests.integration.conftest import LoopThread, vllm_settings

pytestmark = pytest.mark.vllm

WINDOW = 16
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def windowed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(window 16, the same weights with a window of 4096, longer than any sequence here)."""
    from paligemma.checkpoint import TinyConfig, build_tiny_checkpoint

    root = tmp_path_factory.mktemp("gemma2-window")
    cfg = TinyConfig(text_model="gemma2", sliding_window=WINDOW, init_std=0.3)
    short = build_tiny_checkpoint(root / "short", seed=0, cfg=cfg)
    wide = Path(shutil.copytree(short, root / "wide"))
    config = json.loads((wide / "config.json").read_text())
    config["text_config"]["sliding_window"] = 4096
    (wide / "config.json").write_text(json.dumps(config))
    return short, wide


def _requests() -> list[GenerationRequest]:
    return [GenerationRequest(image=im, prefix=p, max_new_tokens=NEW_TOKENS) for p in PROMPTS for im in images()]


def _transformers_ids(checkpoint: Path, *, keep_sliding_window: bool) -> list[list[int]]:
    from service.engines.hf_engine import HFEngine
    from service.engines.hf_model import load_model
    from tests.service.conftest import make_settings

    model, processor = load_model(make_settings(checkpoint, keep_sliding_window=keep_sliding_window))
    model.set_attn_implementation("eager")  # Gemma 2's attention soft-capping, as vLLM applies it

    async def run() -> list[list[int]]:
        engine = HFEngine(model, processor, model_name="windowed", max_batch_size=16)
        engine.start()
        try:
            return [list(g.token_ids) for g in await asyncio.gather(*(engine.generate(r) for r in _requests()))]
        finally:
            await engine.aclose()

    return asyncio.run(run())


def _vllm_ids(loop: LoopThread, checkpoint: Path, *, keep_sliding_window: bool) -> list[list[int]]:
    from service.engines.vllm_engine import open_vllm_engine

    settings = vllm_settings(checkpoint, None, keep_sliding_window=keep_sliding_window, max_model_len=256)

    async def run() -> list[list[int]]:
        async with open_vllm_engine(settings) as engine:
            return [list(g.token_ids) for g in await asyncio.gather(*(engine.generate(r) for r in _requests()))]

    return loop.run(run(), timeout=600)


@pytest.fixture(scope="module")
def unbounded(windowed: tuple[Path, Path]) -> list[list[int]]:
    """The reference: transformers on the wide checkpoint as it is (its window covers every sequence)."""
    ids = _transformers_ids(windowed[1], keep_sliding_window=True)
    assert sum(len(i) == NEW_TOKENS for i in ids) >= 10  # nearly every answer runs to its last token
    assert sum(len(set(i)) > 4 for i in ids) >= 8  # and varies, so every token generated matters
    return ids


def test_both_engines_attend_globally_by_default(
    windowed: tuple[Path, Path], unbounded: list[list[int]], engine_loop: LoopThread
) -> None:
    short, _ = windowed
    assert _transformers_ids(short, keep_sliding_window=False) == unbounded
    assert _vllm_ids(engine_loop, short, keep_sliding_window=False) == unbounded


def test_keep_sliding_window_bands_attention_in_both_engines(
    windowed: tuple[Path, Path], unbounded: list[list[int]], engine_loop: LoopThread
) -> None:
    short, _ = windowed
    transformers_kept = _transformers_ids(short, keep_sliding_window=True)
    vllm_kept = _vllm_ids(engine_loop, short, keep_sliding_window=True)
    assert sum(k != u for k, u in zip(transformers_kept, unbounded, strict=True)) >= 10
    assert sum(k != u for k, u in zip(vllm_kept, unbounded, strict=True)) >= 10
