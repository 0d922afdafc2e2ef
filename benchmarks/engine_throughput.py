"""Throughput of the engines at concurrency 1, 4 and 16, in one run, and what the prefix-LM plugin costs.

    .venv/bin/python benchmarks/engine_throughput.py [--model models/demo] [--requests 48] [--max-new-tokens 64]

Three engine setups run one after the other, each in its own process, on the same checkpoint (default:
the tiny random one, built in a temporary directory), with the same held-out images of the demo's data
and the same ``detect`` prompt:

- ``transformers``: the service's transformers engine (dynamic batching, batch up to 16);
- ``vllm``: the service's vLLM engine, with the project's prefix-LM plugin (PaliGemma's trained mask;
  chunked prefill and prefix caching off, a scheduler that never preempts);
- ``vllm-stock``: the same vLLM engine class over stock vLLM (plugin not loaded, chunked prefill and
  prefix caching on, vLLM's scheduler): the configuration the plugin replaces, wrong mask included.

Requests/s and generated tokens/s per level; the ratios compare setups measured in the same run. Not a
test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CONCURRENCY = (1, 4, 16)
PREFIX = "detect circle ; square ; triangle"
SETUPS = ("transformers", "vllm", "vllm-stock")


def _settings(model: str, engine: str, args: argparse.Namespace) -> Any:
    from service.settings import Settings

    return Settings(  # type: ignore[call-arg]
        model=model,
        engine=engine,  # type: ignore[arg-type]
        max_new_tokens=args.max_new_tokens,
        max_batch_size=16,
        batch_window_ms=5,
        max_model_len=512,
        max_num_seqs=16,
        enforce_eager=True,
        kv_cache_gib=1,
    )


def _open(setup: str, model: str, args: argparse.Namespace) -> Any:
    """The engine for ``setup`` as an async context manager."""
    from service.engines import open_engine

    settings = _settings(model, "transformers" if setup == "transformers" else "vllm", args)
    return open_engine(settings) if setup != "vllm-stock" else _open_stock_vllm(settings)


def _open_stock_vllm(settings: Any) -> Any:
    """The service's VLLMEngine over an AsyncLLM built with vLLM's defaults (no project plugin)."""
    from contextlib import asynccontextmanager

    from transformers import AutoTokenizer
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from service.engines.vllm_engine import VLLMEngine

    @asynccontextmanager
    async def stock() -> Any:
        args = AsyncEngineArgs(
            model=settings.model,
            dtype="float32",
            max_model_len=settings.max_model_len,
            max_num_seqs=settings.max_num_seqs,
            enforce_eager=True,
            limit_mm_per_prompt={"image": 1},
            kv_cache_memory_bytes=int(settings.kv_cache_gib * 2**30),
        )
        llm = AsyncLLM.from_engine_args(args)
        try:
            yield VLLMEngine(llm, settings, AutoTokenizer.from_pretrained(settings.model))
        finally:
            llm.shutdown()

    return stock()


async def _measure(setup: str, model: str, args: argparse.Namespace) -> dict[str, list[float]]:
    from finetune.data.synth import render
    from finetune.recipes.demo_config import DemoConfig
    from service.engines.protocol import GenerationRequest

    images = [render(DemoConfig().heldout_seed, i)[0] for i in range(args.requests)]
    requests, tokens = [], []
    async with _open(setup, model, args) as engine:
        for image in images[:4]:  # warm-up
            await engine.generate(GenerationRequest(image, PREFIX, args.max_new_tokens))
        for concurrency in CONCURRENCY:
            queue = iter(images)
            generated = 0

            async def worker() -> None:
                nonlocal generated
                for image in queue:  # noqa: B023 - each level drains its own iterator
                    generation = await engine.generate(GenerationRequest(image, PREFIX, args.max_new_tokens))
                    generated += generation.completion_tokens  # noqa: B023

            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            elapsed = time.perf_counter() - start
            requests.append(len(images) / elapsed)
            tokens.append(generated / elapsed)
    return {"requests": requests, "tokens": tokens}


def _child(setup: str, model: str, args: argparse.Namespace) -> dict[str, list[float]]:
    """Run one setup in a fresh process (a process that loaded the plugin keeps it) -> its rates."""
    env = os.environ | ({"VLLM_PLUGINS": "lora_filesystem_resolver"} if setup == "vllm-stock" else {})
    command = [sys.executable, __file__, "--model", model, "--requests", str(args.requests)]
    command += ["--max-new-tokens", str(args.max_new_tokens), "--setup", setup]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{setup} failed:\n{out.stderr[-3000:]}")
    line = next(line for line in out.stdout.splitlines() if line.startswith("{"))
    return dict(json.loads(line))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint directory (default: a fresh tiny random one)")
    parser.add_argument("--requests", type=int, default=48, help="requests per concurrency level")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--setup", choices=SETUPS, help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # the KV cache size is set explicitly
    if args.setup:
        print(json.dumps(asyncio.run(_measure(args.setup, args.model, args))))  # noqa: T201
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from paligemma.checkpoint import build_tiny_checkpoint

            model = str(build_tiny_checkpoint(Path(tmp) / "tiny"))
        results = {setup: _child(setup, model, args) for setup in SETUPS}
    hf, vllm, stock = (results[s] for s in SETUPS)
    lines = [
        f"{model}: {args.requests} requests per level, up to {args.max_new_tokens} new tokens, prompt {PREFIX!r}",
        "concurrency | transformers req/s (tok/s) | vLLM req/s (tok/s) | stock vLLM req/s (tok/s)"
        " | vLLM / transformers | vLLM / stock vLLM",
    ]
    for i, c in enumerate(CONCURRENCY):
        cells = [f"{r['requests'][i]:.1f} ({r['tokens'][i]:.0f})" for r in (hf, vllm, stock)]
        ratios = f"{vllm['requests'][i] / hf['requests'][i]:.2f} | {vllm['requests'][i] / stock['requests'][i]:.2f}"
        lines.append(f"{c} | " + " | ".join(cells) + f" | {ratios}")
    print("\n".join(lines))  # noqa: T201 - a benchmark prints its table


if __name__ == "__main__":
    main()
