"""CPU thread budgets compared: /detect throughput past saturation and /healthz latency under load, per engine.

    .venv/bin/python benchmarks/cpu_threads.py [--engines transformers,vllm] [--seconds 6] [--rounds 3] [--budgets 1,2]

For each engine, one ``python -m service`` on the demo model per budget: the default (``torch_threads=auto``,
model at nice +10, service/engines/cpu_threads.py), the default with the model at the API process's priority
(``model_nice=0``), then each explicit ``--budgets`` value (``torch_threads=N``; N = the number of cores is
torch's own default), and for vLLM also vLLM's own binding (``VLLM_CPU_OMP_THREADS_BIND=auto``, where the
service leaves cores alone). Against each, wrk's closed loop of /detect requests (a held-out 3-shape image,
the server's default ``max_new_tokens``, so whole answers) at c=1, then ``--rounds`` interleaved runs at c=16
and c=32 (the median is shown), while a separate process probes ``/healthz`` every 50 ms through the loaded
runs. Needs ``wrk`` (``apt-get install wrk``). Prints one table; run it on an otherwise idle machine and
compare rows of the same run.
"""

# ruff: noqa: T201  (a command-line benchmark: the table goes to stdout)
from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the server harness lives in the tests package
from service.settings import Settings  # noqa: E402
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
    from finetune.data.synth import render
    from finetune.recipes.demo_config import DemoConfig

    image, _ = render(DemoConfig().heldout_seed, 0)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def wrk_script(png: bytes, folder: Path) -> Path:
    """A wrk Lua script that POSTs the image to /detect as multipart form data."""
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="objects"\r\n\r\n{OBJECTS}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    )
    (folder / "body.bin").write_bytes(head.encode() + png + f"\r\n--{boundary}--\r\n".encode())
    script = folder / "detect.lua"
    script.write_text(
        f'local f = io.open("{folder / "body.bin"}", "rb"); wrk.body = f:read("*a"); f:close()\n'
        f'wrk.method = "POST"; wrk.headers["Content-Type"] = "multipart/form-data; boundary={boundary}"\n'
    )
    return script


def closed_loop(url: str, script: Path, concurrency: int, seconds: float) -> tuple[float, int]:
    """Requests per second of 2xx answers from ``concurrency`` wrk connections, and the number of others.

    wrk, not an asyncio client: on 2 cores httpx's CPU per request rose from 2.3-2.8 ms at c=16 to 6.4 ms
    at c=32 (one shared pool), so the client, not the server, fell behind; wrk spends about 0.06 ms.
    """
    command = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "-s", str(script), f"{url}/detect"]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    other = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    failed = (int(other.group(1)) if other else 0) + (sum(map(int, errors.groups())) if errors else 0)
    return rate * (total - failed) / total if total else 0.0, failed


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else float("nan")


def measure(
    engine: str, label: str, settings: dict[str, str], env: dict[str, str], args: argparse.Namespace
) -> dict[str, object]:
    extra = {"max_model_len": "256", "kv_cache_gib": "1"} if engine == "vllm" else {}
    extra["max_new_tokens"] = str(Settings.model_fields["max_new_tokens"].default)  # the harness's is 3
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        server = ServiceProcess(ROOT / "models" / "demo", engine=engine, log_level="info", **extra, **settings)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    with server, tempfile.TemporaryDirectory() as folder:
        script = wrk_script(held_out_png(), Path(folder))
        split = next((line.split(": ", 1)[1] for line in server.log().splitlines() if "CPU threads:" in line), "")
        closed_loop(server.url, script, 4, 2)  # warm-up
        rates: dict[int, list[float]] = {c: [] for c in LEVELS}
        rate, failed = closed_loop(server.url, script, LEVELS[0], args.seconds)
        rates[LEVELS[0]].append(rate)
        probe = subprocess.Popen(  # /healthz from its own process through the loaded levels
            [sys.executable, "-c", PROBE, f"{server.url}/healthz"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert probe.stdout is not None and probe.stdout.readline().strip() == "ready"
        for _ in range(args.rounds):  # interleaved, so a noisy moment hits both levels alike
            for concurrency in LEVELS[1:]:
                rate, bad = closed_loop(server.url, script, concurrency, args.seconds)
                rates[concurrency].append(rate)
                failed += bad
        probe_ms = json.loads(probe.communicate(timeout=60)[0].splitlines()[-1])  # closes its stdin: it stops
    row: dict[str, object] = {"engine": engine, "budget": label, "split": split.split(":")[0], "failed": failed}
    row.update({f"c={c}": statistics.median(values) for c, values in rates.items()})
    row.update({f"c={c} runs": values for c, values in rates.items()})
    row["healthz p99 ms"], row["probes"] = p99(probe_ms), len(probe_ms)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default="transformers,vllm")
    parser.add_argument("--seconds", type=float, default=6, help="length of each wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="c=16 and c=32 runs per budget (median shown)")
    cores = len(os.sched_getaffinity(0))
    parser.add_argument("--budgets", default=",".join(str(n) for n in sorted({1, max(1, cores // 2), cores})))
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: install it (Debian/Ubuntu: apt-get install wrk)")
    rows = []
    for engine in args.engines.split(","):
        runs: list[tuple[str, dict[str, str], dict[str, str]]] = [("auto (default)", {}, {})]
        runs.append(("auto, model_nice=0", {"model_nice": "0"}, {}))
        runs += [(f"torch_threads={n}", {"torch_threads": n}, {}) for n in args.budgets.split(",")]
        if engine == "vllm":
            runs.append(("vLLM's own binding", {}, {"VLLM_CPU_OMP_THREADS_BIND": "auto"}))
        for label, settings, env in runs:
            rows.append(measure(engine, label, settings, env, args))
            print(f"  measured {engine} {label}", file=sys.stderr, flush=True)
    print(
        f"{cores} usable cores, demo model, /detect with a 3-shape PNG, wrk closed loop, "
        f"{args.seconds:g} s per run, median of {args.rounds} interleaved c=16/c=32 runs"
    )
    print("| engine | budget | c=1 req/s | c=16 req/s | c=32 req/s | c=32 ÷ c=16 | /healthz p99 under load |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        c1, c16, c32 = (float(row[f"c={c}"]) for c in LEVELS)  # type: ignore[arg-type]
        failed = int(row["failed"])  # type: ignore[call-overload]
        note = f" ({failed} failed)" if failed else ""
        print(
            f"| {row['engine']} | {row['budget']} | {c1:.1f} | {c16:.1f} | {c32:.1f} | {c32 / c16:.2f} | "
            f"{float(row['healthz p99 ms']):.1f} ms{note} |"  # type: ignore[arg-type]
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
