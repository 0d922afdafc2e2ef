"""A vLLM engine started once per module, on an event loop in a background thread.

Starting vLLM costs ~35 s on 2 cores, so the engine tests share one engine; the loop thread lets sync
tests drive the async engine (``engine_loop.run(coro)``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 300) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def random_lora(checkpoint: Path, out: Path, *, std: float, seed: int) -> Path:
    """A PEFT LoRA adapter (r 8) on the language model of ``checkpoint`` with ``lora_B`` drawn at ``std``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import PaliGemmaForConditionalGeneration

    model = PaliGemmaForConditionalGeneration.from_pretrained(checkpoint)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        init_lora_weights=False,
        target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
    )
    peft_model = get_peft_model(model, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, std)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def lora_adapter(varied_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter on the varied tiny checkpoint, far from identity."""
    return random_lora(varied_checkpoint, tmp_path_factory.mktemp("adapter"), std=0.5, seed=1)


@pytest.fixture(scope="module")
def engine_loop() -> Iterator[LoopThread]:
    loop = LoopThread()
    yield loop
    loop.close()


def vllm_settings(checkpoint: Path, adapter: Path | None, **overrides: Any) -> Any:
    """Settings for the vLLM engine on the tiny checkpoint: small, eager, 1 GiB of KV cache; ``adapter``
    (if any) served as ``shapes``."""
    from service.settings import Settings

    values: dict[str, Any] = {
        "model": str(checkpoint),
        "engine": "vllm",
        "max_model_len": 512,
        "max_num_seqs": 16,
        "enforce_eager": True,
        "kv_cache_gib": 1,
        "lora": [f"shapes={adapter}"] if adapter is not None else [],
        "max_new_tokens": 8,
        "max_new_tokens_limit": 400,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="module")
def vllm_engine(engine_loop: LoopThread, varied_checkpoint: Path, lora_adapter: Path) -> Iterator[Any]:
    from service.engines.vllm_engine import open_vllm_engine

    manager = open_vllm_engine(vllm_settings(varied_checkpoint, lora_adapter))
    engine = engine_loop.run(manager.__aenter__())
    yield engine
    engine_loop.run(manager.__aexit__(None, None, None))
