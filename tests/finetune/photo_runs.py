"""One-epoch trainings on photo-sized JPEGs in fresh interpreters, measured: for the flat-memory test and
``benchmarks/photo_training.py``.

Each run is ``python -m finetune train`` of the tree at ``root`` (``/work/main``, or a clone at an older
commit for a before/after), inside an interpreter that then reports its own peak RSS (``RUSAGE_SELF``) and
that of its DataLoader workers (``RUSAGE_CHILDREN``: the workers are its only children).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

MEASURE = """
import json, resource, sys
sys.path.insert(0, sys.argv[1])
from finetune.__main__ import main
main(sys.argv[2:])
usage = {"self": resource.RUSAGE_SELF, "children": resource.RUSAGE_CHILDREN}
print(json.dumps({k: resource.getrusage(v).ru_maxrss for k, v in usage.items()}))  # KiB on Linux
"""


@dataclass(frozen=True)
class Run:
    photos: int
    workers: int
    peak_rss_mib: float
    """The training process."""
    worker_peak_rss_mib: float
    """The largest DataLoader worker (0 without workers)."""
    steps: int
    seconds: float
    """Training time as ``train_result.json`` records it (model loading and data checks excluded)."""

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.seconds if self.seconds else 0.0


def photo_subset(photos: Path, n: int) -> Path:
    """A COCO file next to ``photos/annotations.json`` with only its first ``n`` images."""
    coco = json.loads((photos / "annotations.json").read_text())
    keep = {im["id"] for im in coco["images"][:n]}
    if len(keep) < n:
        raise ValueError(f"{photos} holds {len(keep)} photos, not {n}")
    coco["images"] = [im for im in coco["images"] if im["id"] in keep]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in keep]
    path = photos / f"annotations-{n}.json"
    path.write_text(json.dumps(coco) + "\n")
    return path


def train_epoch(
    root: Path, base: Path, photos: Path, n: int, out: Path, *, workers: int = 0, batch_size: int = 10
) -> Run:
    """One epoch of LoRA on the first ``n`` photos with the tree at ``root``; figures of the run."""
    out.mkdir(parents=True, exist_ok=True)
    args = ["train", "--base", str(base), "--out", str(out), "--coco", str(photo_subset(photos, n))]
    args += ["--method", "lora", "--epochs", "1", "--batch-size", str(batch_size), "--workers", str(workers)]
    args += ["--absent-per-image", "0", "--logging-steps", "1000", "--save-steps", "100000"]
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(MEASURE), str(root), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=out,
        timeout=900,
    )
    if result.returncode != 0:
        raise RuntimeError(f"training at {root} failed:\n{result.stderr[-4000:]}")
    peaks = json.loads(result.stdout.strip().splitlines()[-1])
    record = json.loads((out / "train_result.json").read_text())
    worker = peaks["children"] / 1024 if workers else 0.0
    return Run(n, workers, peaks["self"] / 1024, worker, int(record["steps"]), float(record["seconds"]))
