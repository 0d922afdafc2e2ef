"""Real widths and the real vocabulary, through the project's own commands with their defaults.

Checkpoints from ``python -m finetune random-like`` with the released PaliGemma 1 and 2 (224 px) widths,
the 257,216-token vocabulary and 256 image tokens, but two decoder blocks and one SigLIP block, so each
stage takes seconds. Every stage runs as a user runs it, in its own process: LoRA training with no flag
beyond the data and a step count (the old ``--max-length`` default of 256 crashed here on the first batch),
a merge whose peak memory is held to 1.5x the checkpoint it writes (it was about 10 bytes per parameter),
then ``python -m service`` on both engines with default settings: ``/readyz`` only once the weights are
resident and a warm-up generation has run, vLLM's ``max_model_len`` derived from the image tokens, and the
same ``/detect`` answer from both engines.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from PIL import Image

from paligemma.shards import checkpoint_files
from service.engines.precision import cpu_bf16_flags
from tests.reliability.server import ServiceProcess

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ARCHS = ("paligemma2-3b-224", "paligemma-3b-224")
DTYPE = "bfloat16" if cpu_bf16_flags() else "float32"
"""What ``--dtype auto`` picks for these bfloat16 checkpoints on this CPU (service.engines.precision)."""


def run_measured(args: list[str], cwd: Path | None = None) -> int:
    """Run ``python -m <args>`` to completion; its peak RSS in bytes (``wait4``'s ru_maxrss, in KiB on Linux)."""
    process = subprocess.Popen([sys.executable, "-m", *args], cwd=cwd, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    stderr = process.stderr.read() if process.stderr else ""
    assert os.waitstatus_to_exitcode(status) == 0, stderr[-4000:]
    return int(usage.ru_maxrss) * 1024


def weights_bytes(checkpoint: Path) -> int:
    return sum(path.stat().st_size for path in checkpoint_files(checkpoint))


def resident_bytes(pid: int) -> int:
    """VmRSS: pages this process has touched, file-backed (a memory-mapped checkpoint) included."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert match, status
    return int(match.group(1)) * 1024


@dataclass(frozen=True)
class Pipeline:
    base: Path
    run: Path
    merged: Path
    data: Path
    merge_peak: int
    """Peak RSS of the merge process, bytes."""


@pytest.fixture(scope="module", params=ARCHS)
def pipeline(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    """random-like -> train (LoRA, default flags) -> merge (default dtype), each a real process."""
    from finetune.data.synth import generate

    arch = str(request.param)
    work = tmp_path_factory.mktemp(arch)
    data = generate(work / "data", 2, seed=3)  # one example each: a batch of 2 at the default --batch-size 8
    base = work / "base"
    run_measured(["finetune", "random-like", arch, "--out", str(base), "--layers", "2", "--vision-layers", "1"])
    run = work / "run"
    train = ["finetune", "train", "--base", str(base), "--out", str(run), "--coco", str(data / "annotations.json")]
    run_measured([*train, "--max-steps", "2"])
    merged = work / "merged"
    peak = run_measured(["finetune", "merge", "--run", str(run), "--out", str(merged)])
    return Pipeline(base=base, run=run, merged=merged, data=data, merge_peak=peak)


def test_training_with_default_flags_trains_and_merge_stays_within_the_output_size(pipeline: Pipeline) -> None:
    record = json.loads((pipeline.run / "train_config.json").read_text())
    assert record["max_length"] is None  # nothing given: the image tokens and the data decide
    assert json.loads((pipeline.run / "train_result.json").read_text())["steps"] == 2
    assert json.loads((pipeline.merged / "config.json").read_text())["dtype"] == "bfloat16"
    output = weights_bytes(pipeline.merged)
    assert output > 1.0e9  # the real 257,216 x hidden embedding alone is over a gigabyte in bf16
    peak = pipeline.merge_peak
    assert peak <= 1.5 * output, f"merge peak {peak / 2**30:.2f} GiB for a {output / 2**30:.2f} GiB checkpoint"


def _detect(server: ServiceProcess, image: bytes) -> dict[str, object]:
    response = httpx.post(
        f"{server.url}/detect",
        files={"image": ("shape.png", image, "image/png")},
        data={"objects": "circle ; square", "max_new_tokens": "12"},
        timeout=300,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    return {"text": body["text"], "boxes": [(d["label"], d["box"]) for d in body["detections"]]}


def test_both_engines_serve_the_merged_model_with_defaults_and_agree(pipeline: Pipeline) -> None:
    buffer = io.BytesIO()
    with Image.open(sorted((pipeline.data / "images").iterdir())[0]) as image:
        image.convert("RGB").save(buffer, format="PNG")
    answers = {}
    with ServiceProcess(pipeline.merged, log_level="info") as server:
        # ready means the weights are in memory: the checkpoint is memory-mapped, so without the warm-up
        # generation only the pages that loading touched would be resident
        assert resident_bytes(server.process.pid) >= 0.9 * weights_bytes(pipeline.merged)
        assert "warm-up generation" in server.log()
        assert f"dtype auto: {DTYPE}" in server.log()
        answers["transformers"] = _detect(server, buffer.getvalue())
    server = ServiceProcess(pipeline.merged, engine="vllm", log_level="info")
    try:
        server.wait_ready(timeout_s=900)
        log = server.log()
        assert "warm-up generation" in log and f"dtype auto: {DTYPE}" in log
        assert "max_model_len 1026" in log  # 256 image tokens + 2 + 256 prompt + 512 answer, not the config's 8192
        running = re.search(r"running at most (\d+) at once", log)
        assert running and int(running.group(1)) >= 8, log[-3000:]
        answers["vllm"] = _detect(server, buffer.getvalue())
    finally:
        server.close()
    assert answers["transformers"] == answers["vllm"]
    assert str(answers["vllm"]["text"]).startswith("<loc")
