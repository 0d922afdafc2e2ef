"""Throughput of the vLLM engine at concurrency 1, 4 and 16, and its ratio to the transformers engine.

    .venv/bin/python benchmarks/engine_throughput.py [--model DIR] [--requests 48] [--max-new-tokens 16]

Both engines run in this process, one after the other, on the same checkpoint (default: the tiny random
one, built in a temporary directory), with the same unique images and the same prompt. Every request
generates exactly ``--max-new-tokens`` tokens (a random model never emits eos), so requests/s compare
like for like. The ratio is vLLM's requests/s over transformers' at the same concurrency, measured in the
same run. Not a test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from service.engine import GenerationRequest
from service.engines import open_engine
from service.settings import Settings

CONCURRENCY = (1, 4, 16)
PREFIX = "detect red circle ; blue square"


def _images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)) for _ in range(n)]


async def _run(engine_kind: str, model: str, args: argparse.Namespace) -> dict[int, float]:
    settings = Settings(
        model=model,
        engine=engine_kind,  # type: ignore[arg-type]
        max_new_tokens=args.max_new_tokens,
        max_batch_size=16,
        batch_window_ms=5,
        max_model_len=512,
        max_num_seqs=16,
        enforce_eager=True,
        kv_cache_gib=1,
    )
    images = _images(args.requests)
    rates: dict[int, float] = {}
    async with open_engine(settings) as engine:
        for image in images[:4]:  # warm-up
            await engine.generate(GenerationRequest(image, PREFIX, args.max_new_tokens))
        for concurrency in CONCURRENCY:
            queue = iter(images)

            async def worker() -> None:
                for image in queue:  # noqa: B023 - each level drains its own iterator
                    generation = await engine.generate(GenerationRequest(image, PREFIX, args.max_new_tokens))
                    assert generation.completion_tokens == args.max_new_tokens

            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            rates[concurrency] = len(images) / (time.perf_counter() - start)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint directory (default: a fresh tiny random one)")
    parser.add_argument("--requests", type=int, default=48, help="requests per concurrency level")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from paligemma.checkpoint import build_tiny_checkpoint

            model = str(build_tiny_checkpoint(Path(tmp) / "tiny"))
        results = {kind: asyncio.run(_run(kind, model, args)) for kind in ("vllm", "transformers")}
    lines = [
        f"{args.requests} requests per level, {args.max_new_tokens} new tokens each, prompt {PREFIX!r}",
        "concurrency  vLLM req/s  transformers req/s  vLLM / transformers",
    ]
    for c in CONCURRENCY:
        vllm, hf = results["vllm"][c], results["transformers"][c]
        lines.append(f"{c:>11}  {vllm:>10.1f}  {hf:>18.1f}  {vllm / hf:>19.2f}")
    print("\n".join(lines))  # noqa: T201 - a benchmark prints its table


if __name__ == "__main__":
    main()
