"""A real-size PaliGemma through the project's own commands on this machine: time and peak memory per stage.

Stages, each a separate process run exactly as a user runs it (default flags unless named below):

1. ``python -m finetune random-like ARCH`` (full depth, bf16, the released architecture and vocabulary);
2. ``python -m service --engine transformers``: seconds until ``/readyz`` is 200 (weights resident, one
   warm-up generation run), resident memory then, ``/detect`` latency;
3. ``python -m service --engine vllm --kv-cache-gib 2``: the same, plus vLLM's own line saying how many
   requests it admits at once for the derived ``max_model_len``;
4. ``python -m finetune train --method lora`` on a few synthetic images for ``--train-steps`` steps
   (the step count and the data are the only flags; batch size, precision, max length: the defaults);
5. ``python -m finetune merge`` of that run (default dtype bfloat16): peak memory against the output's size.

Peak memory is the process's ``ru_maxrss`` (``wait4``) for one-process stages, and the largest proportional set
size (PSS) of the server's process tree (vLLM's engine core and worker are child processes), sampled every 0.5 s,
for serving.
Not a test: it prints a table (markdown) and writes the figures as JSON.

    python benchmarks/real_size.py --work /tmp/real-size                  # paligemma2-3b-224, ~30 min on 2 cores
    python benchmarks/real_size.py --work /tmp/real-size --dry-run        # 2 layers: the whole path in minutes
"""

# ruff: noqa: T201  (a command-line benchmark: the table goes to stdout)
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
DETECT_TOKENS = 8
"""New tokens per ``/detect``: one object (four locs, the label, eos) fits; a random model fills them all."""


def run_stage(args: list[str], log: Path) -> dict[str, float]:
    """``python -m <args>`` to completion: seconds and peak RSS (GiB)."""
    start = time.monotonic()
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(args[:2])} failed; see {log}:\n{log.read_text()[-3000:]}")
    return {"seconds": round(time.monotonic() - start, 1), "peak_gib": round(usage.ru_maxrss * 1024 / GIB, 2)}


def tree_pss(pid: int) -> int:
    """Proportional set size of ``pid`` and its descendants, bytes: resident pages, a page shared by several of
    them (vLLM's API process, engine core and worker map the same libraries) counted once in all."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            rollup = Path(f"/proc/{current}/smaps_rollup").read_text()
            for task in Path(f"/proc/{current}/task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
        match = re.search(r"^Pss:\s+(\d+) kB", rollup, re.MULTILINE)
        total += int(match.group(1)) * 1024 if match else 0
    return total


class Peak(threading.Thread):
    """Samples :func:`tree_pss` of a process until stopped; ``peak`` in bytes."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self._stop_event = pid, 0, threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(0.5):
            self.peak = max(self.peak, tree_pss(self.pid))

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def detect(url: str, image: bytes) -> float:
    start = time.monotonic()
    response = httpx.post(
        f"{url}/detect",
        files={"image": ("i.png", image, "image/png")},
        data={"objects": "circle", "max_new_tokens": str(DETECT_TOKENS)},
        timeout=3600,
    )
    response.raise_for_status()
    return time.monotonic() - start


def serve_stage(model: Path, engine: str, flags: list[str], image: bytes, requests: int, log: Path) -> dict[str, Any]:
    """Start the service, time ``/readyz``, send ``requests`` sequential ``/detect`` calls, stop it."""
    port = free_port()
    env = {**os.environ, "PALIGEMMA_LOG_LEVEL": "info"}
    command = [sys.executable, "-m", "service", "--model", str(model), "--engine", engine, "--port", str(port)]
    command += ["--request-timeout-s", "3600"]  # a full-size model on a few CPU cores takes minutes
    url, start = f"http://127.0.0.1:{port}", time.monotonic()
    with log.open("w") as out:
        process = subprocess.Popen([*command, *flags], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    peak = Peak(process.pid)
    peak.start()
    try:
        while True:
            if process.poll() is not None:
                raise SystemExit(f"the {engine} server exited; see {log}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        ready = time.monotonic() - start
        resident = tree_pss(process.pid)
        latencies = [detect(url, image) for _ in range(requests)]
    finally:
        process.terminate()
        process.wait(120)
        peak_bytes = peak.stop()
    text = log.read_text(errors="replace")
    result: dict[str, Any] = {
        "ready_seconds": round(ready, 1),
        "resident_at_ready_gib": round(resident / GIB, 2),
        "peak_gib": round(peak_bytes / GIB, 2),
        "detect_seconds": round(statistics.median(latencies), 1) if latencies else None,
    }
    if dtype := re.search(r"dtype auto: (\w+)", text):
        result["dtype"] = dtype.group(1)
    if admitted := re.search(r"holds (\d+) sequences of max_model_len (\d+); running at most (\d+)", text):
        result |= {"kv_fits": int(admitted[1]), "max_model_len": int(admitted[2]), "admitted": int(admitted[3])}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="paligemma2-3b-224")
    parser.add_argument("--work", type=Path, required=True, help="folder for the checkpoint, data, runs, logs")
    parser.add_argument("--dry-run", action="store_true", help="2 text + 1 vision layers: the path, not the figures")
    parser.add_argument("--train-images", type=int, default=2, help="synthetic training images (one example each)")
    parser.add_argument("--train-steps", type=int, default=1)
    parser.add_argument("--requests", type=int, default=1, help="sequential /detect requests per engine")
    parser.add_argument("--kv-cache-gib", type=float, default=2.0)
    parser.add_argument("--skip", action="append", default=[], choices=["transformers", "vllm", "train", "merge"])
    parser.add_argument("--json", type=Path, default=None, help="default: WORK/real_size.json")
    args = parser.parse_args()

    from finetune.data.synth import generate

    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    base, figures = work / "base", {"arch": args.arch, "dry_run": args.dry_run}
    layers = ["--layers", "2", "--vision-layers", "1"] if args.dry_run else []
    if (base / "random_like.json").is_file():
        print(f"reusing {base}", flush=True)
    else:
        figures["build"] = run_stage(
            ["finetune", "random-like", args.arch, "--out", str(base), *layers], work / "build.log"
        )
        print(figures["build"], flush=True)
    figures["checkpoint_gib"] = round(sum(p.stat().st_size for p in base.glob("*.safetensors")) / GIB, 2)
    data = generate(work / "data", args.train_images, seed=11, max_shapes=1)
    image = (sorted((data / "images").iterdir())[0]).read_bytes()
    if "transformers" not in args.skip:
        figures["transformers"] = serve_stage(base, "transformers", [], image, args.requests, work / "hf.log")
        print(figures["transformers"], flush=True)
    if "vllm" not in args.skip:
        flags = ["--kv-cache-gib", str(args.kv_cache_gib)]
        figures["vllm"] = serve_stage(base, "vllm", flags, image, args.requests, work / "vllm.log")
        print(figures["vllm"], flush=True)
    run = work / "run"
    if "train" not in args.skip:
        train = ["finetune", "train", "--base", str(base), "--out", str(run), "--coco", str(data / "annotations.json")]
        stage = run_stage([*train, "--max-steps", str(args.train_steps), "--logging-steps", "1"], work / "train.log")
        steps = json.loads((run / "train_result.json").read_text())
        figures["train"] = stage | {"steps": steps["steps"], "train_seconds": steps["seconds"]}
        print(figures["train"], flush=True)
    if "merge" not in args.skip:
        merged = work / "merged"
        figures["merge"] = run_stage(
            ["finetune", "merge", "--run", str(run), "--out", str(merged), "--force"], work / "merge.log"
        )
        output = sum(p.stat().st_size for p in merged.glob("*.safetensors")) / GIB
        figures["merge"] |= {
            "output_gib": round(output, 2),
            "peak_over_output": round(figures["merge"]["peak_gib"] / output, 2),
        }
        print(figures["merge"], flush=True)
    (args.json or work / "real_size.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
