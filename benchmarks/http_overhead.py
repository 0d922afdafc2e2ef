"""Requests/s at concurrency 1 and 16, over HTTP and straight into the engine, and the HTTP overhead.

    .venv/bin/python benchmarks/http_overhead.py [--model DIR] [--requests 64] [--max-new-tokens 8]

Without ``--model`` it builds the tiny random checkpoint in a temporary directory. The HTTP side runs
``python -m service`` in its own process and calls it with ``service.client.AsyncClient`` (multipart
``/detect``); the direct side opens the same engine in this process and awaits ``engine.generate`` with
an already-decoded image. The difference at concurrency 1 is what the HTTP layer costs per request
(multipart parsing, image decoding, parsing detections, JSON). Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
from PIL import Image

from service.client import AsyncClient
from service.engines import open_engine
from service.engines.protocol import GenerationRequest
from service.settings import Settings

PREFIX_OBJECTS = ["cat", "dog"]


async def _measure(call: Callable[[], Awaitable[object]], concurrency: int, total: int) -> tuple[float, float]:
    """(requests/s, mean latency in ms) for ``total`` calls with ``concurrency`` in flight."""
    latencies: list[float] = []
    remaining = iter(range(total))

    async def worker() -> None:
        for _ in remaining:
            start = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    return total / wall, statistics.fmean(latencies) * 1000


async def _direct(settings: Settings, image: Image.Image, levels: list[tuple[int, int]]) -> list[tuple[float, float]]:
    async with open_engine(settings) as engine:
        request = GenerationRequest(image, "detect " + " ; ".join(PREFIX_OBJECTS), settings.max_new_tokens)
        for _ in range(4):  # warm-up
            await engine.generate(request)
        return [await _measure(lambda: engine.generate(request), c, n) for c, n in levels]


async def _http(url: str, png: bytes, levels: list[tuple[int, int]]) -> list[tuple[float, float]]:
    async with AsyncClient(url, http=httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits())) as client:
        for _ in range(4):  # warm-up
            await client.detect(png, PREFIX_OBJECTS)
        return [await _measure(lambda: client.detect(png, PREFIX_OBJECTS), c, n) for c, n in levels]


def _start_server(settings: Settings) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "service",
        "--model",
        settings.model,
        "--engine",
        settings.engine,
        "--port",
        str(port),
        "--max-new-tokens",
        str(settings.max_new_tokens),
        "--max-batch-size",
        str(settings.max_batch_size),
        "--log-level",
        "warning",
    ]
    process = subprocess.Popen(command)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.5)
    process.terminate()
    raise RuntimeError("the server did not become ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory (default: a fresh tiny random one)")
    parser.add_argument("--engine", default="transformers")
    parser.add_argument("--requests", type=int, default=128, help="requests at concurrency 16 (a quarter at 1)")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from paligemma.checkpoint import build_tiny_checkpoint

            model = str(build_tiny_checkpoint(Path(tmp) / "tiny", seed=0))
        settings = Settings(model=model, engine=args.engine, max_new_tokens=args.max_new_tokens, max_batch_size=16)
        image = Image.new("RGB", (640, 480), (120, 80, 200))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        levels = [(1, max(args.requests // 4, 8)), (16, args.requests)]
        direct = asyncio.run(_direct(settings, image, levels))
        process, url = _start_server(settings)
        try:
            http = asyncio.run(_http(url, buffer.getvalue(), levels))
        finally:
            process.terminate()
            process.wait(timeout=60)
    out = sys.stdout.write
    out(f"model={Path(model).name} engine={args.engine} max_new_tokens={args.max_new_tokens} image=640x480 PNG\n")
    out(
        f"{'concurrency':>11} {'requests':>8} {'engine req/s':>12} {'HTTP req/s':>10} "
        f"{'engine ms':>9} {'HTTP ms':>8} {'overhead ms':>11}\n"
    )
    for (concurrency, total), (e_rps, e_ms), (h_rps, h_ms) in zip(levels, direct, http, strict=True):
        overhead = h_ms - e_ms
        out(f"{concurrency:>11} {total:>8} {e_rps:>12.1f} {h_rps:>10.1f} {e_ms:>9.1f} {h_ms:>8.1f} {overhead:>11.1f}\n")


if __name__ == "__main__":
    main()
