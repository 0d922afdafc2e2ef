"""Soak: many requests, each with a unique generated image, and the server's RSS at start and end.

    .venv/bin/python benchmarks/soak.py [--requests 10000] [--concurrency 8] [--model DIR] [--url URL]

Without ``--url`` it starts ``python -m service`` (transformers engine, ``--model`` or the tiny random
checkpoint built in a temporary directory, 4 new tokens) on a free loopback port and reads that
process's RSS from ``/proc``. Every image is different (random noise, random size 32..320 px, PNG or
JPEG), so no cache can hide a leak; the endpoints rotate through /detect, /vqa, /caption and /ocr. It
prints RSS at start (after 200 warm-up requests), every 1000 requests, and at the end, plus the error
count. Not a test: not in CI (it takes a while); docs/reliability.md records a run.
"""

# ruff: noqa: T201  (a command-line benchmark: the figures go to stdout)

from __future__ import annotations

import argparse
import asyncio
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.reliability.server import ServiceProcess  # noqa: E402

ENDPOINTS: tuple[tuple[str, dict[str, str]], ...] = (
    ("/detect", {"objects": "cat ; dog"}),
    ("/vqa", {"question": "what is this?"}),
    ("/caption", {}),
    ("/ocr", {}),
)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def unique_image(rng: np.random.Generator) -> tuple[bytes, str]:
    width, height = (int(v) for v in rng.integers(32, 321, 2))
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    fmt = "PNG" if rng.random() < 0.5 else "JPEG"
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, fmt)
    return buf.getvalue(), fmt.lower()


async def run(url: str, pid: int | None, total: int, concurrency: int) -> int:
    rng = np.random.default_rng(0)
    errors = 0
    done = 0
    start = time.monotonic()

    def report(label: str) -> None:
        rss = f"{rss_mib(pid):.0f} MiB" if pid else "n/a"
        rate = done / max(time.monotonic() - start, 1e-9)
        print(f"{label:>8}: {done:6d} requests, {errors} errors, RSS {rss}, {rate:.1f} req/s", flush=True)

    async def worker(client: httpx.AsyncClient, queue: asyncio.Queue[int]) -> None:
        nonlocal errors, done
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            path, fields = ENDPOINTS[i % len(ENDPOINTS)]
            image, ext = unique_image(rng)
            try:
                response = await client.post(path, files={"image": (f"x.{ext}", image)}, data=fields)
                errors += response.status_code != 200
            except httpx.HTTPError:
                errors += 1
            done += 1
            if done % 1000 == 0:
                report("progress")

    async def batch(count: int) -> None:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(count):
            queue.put_nowait(i)
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            await asyncio.gather(*(worker(client, queue) for _ in range(concurrency)))

    await batch(200)  # warm-up: allocator pools, thread pools, first-call caches
    done, errors, start = 0, 0, time.monotonic()
    report("start")
    await batch(total)
    report("end")
    print(f"duration: {time.monotonic() - start:.0f}s", flush=True)
    return errors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--model", type=Path, help="checkpoint directory (default: the tiny random one)")
    parser.add_argument("--url", help="an already running server (RSS is then not reported)")
    args = parser.parse_args()
    if args.url:
        return int(asyncio.run(run(args.url, None, args.requests, args.concurrency)) > 0)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = args.model
    if model is None:
        from paligemma.checkpoint import build_tiny_checkpoint

        model = build_tiny_checkpoint(tempfile.mkdtemp(prefix="soak-"), seed=0)
    settings = {"max_new_tokens": 4, "max_concurrent_requests": 16, "max_queued_requests": 64}
    with ServiceProcess(model, **settings) as server:
        errors = asyncio.run(run(server.url, server.process.pid, args.requests, args.concurrency))
    return int(errors > 0)


if __name__ == "__main__":
    sys.exit(main())
