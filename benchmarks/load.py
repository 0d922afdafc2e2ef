"""Closed-loop load generator for ``POST /detect``: sweeps concurrency, prints throughput and latency.

At each concurrency level C, C workers send requests back to back (each waits for its answer before
sending the next) until the level has sent ``--requests`` requests or ``--duration`` seconds have passed,
whichever comes first. Every request carries a distinct image (random noise PNG from a per-request seed),
so no image or prefix cache can flatter the figures. Printed per level: requests/s (completed 2xx per
second of wall time), p50/p95/p99 latency of the 2xx responses in ms, and error counts by status.

    python benchmarks/load.py --url http://127.0.0.1:8000 --concurrency 1,2,4,8 --requests 40
    python benchmarks/load.py --api-key KEY --json results.json      # PALIGEMMA_API_KEYS set on the server

Run it against a server you started (``make serve``, ``docker compose up``). It is bounded in count and
time and stops by itself.
"""

# ruff: noqa: T201  (a command-line benchmark: the table goes to stdout)
from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import httpx
import numpy as np
from PIL import Image


@dataclass
class Level:
    concurrency: int
    sent: int = 0
    ok: int = 0
    seconds: float = 0.0
    requests_per_s: float = 0.0
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    errors: dict[str, int] = field(default_factory=dict)


def make_image(seed: int, size: int) -> bytes:
    """A distinct PNG per seed (noise compresses badly, like photos)."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


async def run_level(client: httpx.AsyncClient, args: argparse.Namespace, concurrency: int, seed0: int) -> Level:
    level = Level(concurrency)
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    counter = iter(range(args.requests))
    deadline = time.perf_counter() + args.duration
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    async def worker() -> None:
        for i in counter:
            if time.perf_counter() > deadline:
                return
            image = make_image(seed0 + i, args.image_size)
            level.sent += 1
            start = time.perf_counter()
            try:
                resp = await client.post(
                    args.url.rstrip("/") + "/detect",
                    files={"image": (f"{seed0 + i}.png", image, "image/png")},
                    data={"objects": args.objects, "max_new_tokens": str(args.max_new_tokens)},
                    headers=headers,
                )
            except httpx.HTTPError as exc:
                errors[type(exc).__name__] += 1
                continue
            if resp.status_code < 300:
                latencies.append((time.perf_counter() - start) * 1000)
            else:
                errors[str(resp.status_code)] += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    level.seconds = time.perf_counter() - start
    level.ok = len(latencies)
    level.requests_per_s = level.ok / level.seconds if level.seconds else 0.0
    level.p50_ms, level.p95_ms, level.p99_ms = (percentile(latencies, q) for q in (50, 95, 99))
    level.errors = dict(errors)
    return level


def fmt(value: float | None) -> str:
    return f"{value:8.0f}" if value is not None else "       -"


async def main_async(args: argparse.Namespace) -> list[Level]:
    levels = [int(c) for c in args.concurrency.split(",")]
    limits = httpx.Limits(max_connections=max(levels), max_keepalive_connections=max(levels))
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as client:
        ready = await client.get(args.url.rstrip("/") + "/readyz")
        if ready.status_code != 200:
            raise SystemExit(f"{args.url}/readyz answered {ready.status_code}: is the service up?")
        if args.warmup:
            await run_level(client, argparse.Namespace(**{**vars(args), "requests": args.warmup}), 1, 10**6)
        print(
            f"{'concurrency':>11} {'sent':>5} {'ok':>5} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}  errors"
        )
        results = []
        for n, concurrency in enumerate(levels):
            level = await run_level(client, args, concurrency, seed0=n * 100_000)
            results.append(level)
            errs = ", ".join(f"{k}: {v}" for k, v in sorted(level.errors.items())) or "0"
            print(
                f"{concurrency:>11} {level.sent:>5} {level.ok:>5} {level.requests_per_s:7.2f} "
                f"{fmt(level.p50_ms)} {fmt(level.p95_ms)} {fmt(level.p99_ms)}  {errs}",
                flush=True,
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--concurrency", default="1,2,4,8", help="comma-separated levels")
    parser.add_argument("--requests", type=int, default=50, help="most requests per level")
    parser.add_argument("--duration", type=float, default=60.0, help="most seconds per level")
    parser.add_argument("--warmup", type=int, default=2, help="requests before the sweep (not counted)")
    parser.add_argument("--image-size", type=int, default=224, help="side of the square test images")
    parser.add_argument("--objects", default="cat ; dog")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    results = asyncio.run(main_async(args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=2)


if __name__ == "__main__":
    main()
