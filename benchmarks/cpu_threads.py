"""CPU thread budgets compared: /detect throughput past saturation and /healthz latency under load, per engine.

    .venv/bin/python benchmarks/cpu_threads.py [--engines transformers,vllm] [--requests 512] [--budgets 1,2]

For each engine, one ``python -m service`` on the demo model per budget: the default (``torch_threads=auto``,
service/engines/cpu_threads.py), then each explicit ``--budgets`` value (``torch_threads=N``; N = the number of
cores is torch's own default), and for vLLM also vLLM's own binding (``VLLM_CPU_OMP_THREADS_BIND=auto``,
where the service leaves cores alone). Against each, a closed loop of ``--requests`` /detect requests (a
held-out 3-shape image) at c=1, 16 and 32, while a separate process probes ``/healthz`` every 50 ms during the
c=16 and c=32 levels (its own process, so the load generator's event loop does not delay the probe).
Prints one table; run it on an otherwise idle machine and compare rows of the same run.
"""

# ruff: noqa: T201  (a command-line benchmark: the table goes to stdout)
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the server harness lives in the tests package
from tests.reliability.server import ServiceProcess  # noqa: E402

OBJECTS = "circle ; square ; triangle"
LEVELS = (1, 16, 32)
PROBE = """
import json, select, sys, time, httpx
url, out = sys.argv[1], []
with httpx.Client(timeout=10) as client:
    client.get(url)
    print("ready", flush=True)
    while not select.select([sys.stdin], [], [], 0)[0]:  # until the parent closes our stdin
        start = time.perf_counter()
        client.get(url)
        out.append((time.perf_counter() - start) * 1000)
        time.sleep(0.05)
print(json.dumps(out))
"""


def held_out_png() -> bytes:
    from finetune.demo import DemoConfig
    from finetune.synth import render

    image, _ = render(DemoConfig().heldout_seed, 0)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


async def closed_loop(url: str, png: bytes, concurrency: int, requests: int) -> tuple[float, int]:
    """Requests per second of 2xx answers, and the number of other answers."""
    counter, failed = iter(range(requests)), 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:

        async def worker() -> None:
            nonlocal failed
            for _ in counter:
                files = {"image": ("x.png", png, "image/png")}
                response = await client.post(f"{url}/detect", files=files, data={"objects": OBJECTS})
                failed += response.status_code != 200

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return (requests - failed) / (time.perf_counter() - start), failed


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else float("nan")


def measure(
    engine: str, label: str, settings: dict[str, str], env: dict[str, str], args: argparse.Namespace
) -> dict[str, object]:
    png = held_out_png()
    extra = {"max_model_len": "256", "kv_cache_gib": "1"} if engine == "vllm" else {}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        server = ServiceProcess(ROOT / "models" / "demo", engine=engine, log_level="info", **extra, **settings)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    with server:
        split = next((line.split(": ", 1)[1] for line in server.log().splitlines() if "CPU threads:" in line), "")
        asyncio.run(closed_loop(server.url, png, 4, 16))  # warm-up
        row: dict[str, object] = {"engine": engine, "budget": label, "split": split.split(":")[0]}
        for concurrency in LEVELS:
            if concurrency == LEVELS[1]:  # /healthz probed from its own process through the loaded levels
                probe = subprocess.Popen(
                    [sys.executable, "-c", PROBE, f"{server.url}/healthz"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                assert probe.stdout is not None and probe.stdout.readline().strip() == "ready"
            rate, failed = asyncio.run(closed_loop(server.url, png, concurrency, args.requests))
            row[f"c={concurrency}"], row[f"failed c={concurrency}"] = rate, failed
        probe_ms = json.loads(probe.communicate(timeout=60)[0].splitlines()[-1])  # closes its stdin: it stops
        row["healthz p99 ms"] = p99(probe_ms)
        row["probes"] = len(probe_ms)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default="transformers,vllm")
    parser.add_argument("--requests", type=int, default=512)
    cores = len(os.sched_getaffinity(0))
    parser.add_argument("--budgets", default=",".join(str(n) for n in sorted({1, max(1, cores // 2), cores})))
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    rows = []
    for engine in args.engines.split(","):
        runs: list[tuple[str, dict[str, str], dict[str, str]]] = [("auto (default)", {}, {})]
        runs += [(f"torch_threads={n}", {"torch_threads": n}, {}) for n in args.budgets.split(",")]
        if engine == "vllm":
            runs.append(("vLLM's own binding", {}, {"VLLM_CPU_OMP_THREADS_BIND": "auto"}))
        for label, settings, env in runs:
            rows.append(measure(engine, label, settings, env, args))
            print(f"  measured {engine} {label}", file=sys.stderr, flush=True)
    print(f"{cores} usable cores, demo model, /detect with a 3-shape PNG, {args.requests} requests per level")
    print("| engine | budget | c=1 req/s | c=16 req/s | c=32 req/s | c=32 ÷ c=16 | /healthz p99 under load |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        c1, c16, c32 = (float(row[f"c={c}"]) for c in LEVELS)  # type: ignore[arg-type]
        failed = sum(int(row[f"failed c={c}"]) for c in LEVELS)  # type: ignore[call-overload]
        note = f" ({failed} failed)" if failed else ""
        print(
            f"| {row['engine']} | {row['budget']} | {c1:.1f} | {c16:.1f} | {c32:.1f} | {c32 / c16:.2f} | "
            f"{float(row['healthz p99 ms']):.1f} ms{note} |"  # type: ignore[arg-type]
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
