"""Runs you can trust, on real processes: the same config trains the same weights in two processes (LoRA and
full), and a LoRA run killed with SIGKILL (mid-step, or while a checkpoint is being written) then restarted
with ``--resume`` ends with exactly the weights, and the learning curve, of a run never interrupted.

The kill lands at a chosen point (``tests/finetune/interrupt.py``), so nothing depends on timing. 12 steps
of batch 2 over the 12-example set are two epochs: the mid-step kill resumes inside the second epoch
(the Trainer skips the batches already trained), the mid-save kill from ``checkpoint-4`` in the first.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _run(args: list[str], *, kill_at: str | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m finetune`` in a fresh process (through the killer with ``kill_at``)."""
    command = (
        [sys.executable, "-m", "tests.finetune.interrupt", kill_at] if kill_at else [sys.executable, "-m", "finetune"]
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([*command, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _train_args(base: Path, data: Path, out: Path, method: str = "lora", steps: int = 12) -> list[str]:
    return [
        "train", "--base", str(base), "--out", str(out), "--method", method, "--coco", str(data / "annotations.json"),
        "--batch-size", "2", "--max-steps", str(steps), "--save-steps", "4", "--logging-steps", "1", "--lr", "1e-3",
        "--threads", "2", "--seed", "3",
    ]  # fmt: skip


def _trained(out: Path, method: str = "lora") -> dict[str, object]:
    name = "adapter/adapter_model.safetensors" if method == "lora" else "model/model.safetensors"
    return dict(load_file(out / name))


def _same_weights(a: dict[str, object], b: dict[str, object]) -> bool:
    return a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)  # type: ignore[attr-defined]


def _curve(out: Path) -> list[tuple[int, float]]:
    return [(p["step"], p["loss"]) for p in json.loads((out / "learning_curve.json").read_text())]


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: Path, shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted LoRA run everything is compared with."""
    out = tmp_path_factory.mktemp("reference") / "run"
    done = _run(_train_args(tiny_checkpoint, shapes, out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_lora_trains_the_same_weights_in_two_processes(
    reference: Path, tiny_checkpoint: Path, shapes: Path, tmp_path: Path
) -> None:
    again = _run(_train_args(tiny_checkpoint, shapes, tmp_path / "run"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert _same_weights(_trained(reference), _trained(tmp_path / "run"))
    assert _curve(reference) == _curve(tmp_path / "run")


def test_full_trains_the_same_weights_in_two_processes(tiny_checkpoint: Path, shapes: Path, tmp_path: Path) -> None:
    for name in ("a", "b"):
        done = _run([*_train_args(tiny_checkpoint, shapes, tmp_path / name, "full", steps=3), "--snapshot-steps", "2"])
        assert done.returncode == 0, done.stderr[-3000:]
        assert json.loads((tmp_path / name / "snapshots" / "step-2" / "snapshot.json").read_text())["step"] == 2
    assert _same_weights(_trained(tmp_path / "a", "full"), _trained(tmp_path / "b", "full"))


@pytest.mark.parametrize(
    ("kill_at", "resumed_from"),
    [("step:10", "checkpoint-8"), ("save:8", "checkpoint-4")],
    ids=["mid-step", "mid-save"],
)
def test_a_run_killed_and_resumed_ends_like_one_never_interrupted(
    kill_at: str, resumed_from: str, reference: Path, tiny_checkpoint: Path, shapes: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    args = _train_args(tiny_checkpoint, shapes, out)
    killed = _run(args, kill_at=kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (out / "adapter").exists() and not (out / "train_result.json").exists()
    if kill_at.startswith("save"):
        assert (out / "checkpoint-8").is_dir() and not (out / "checkpoint-8" / "sealed.json").exists()

    resumed = _run([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {out / resumed_from} " in resumed.stderr
    if kill_at.startswith("save"):
        assert "checkpoint-8 is incomplete" in resumed.stderr and (out / "checkpoint-8.partial").is_dir()
    assert _same_weights(_trained(reference), _trained(out))
    assert _curve(reference) == _curve(out)
    assert sorted(p.name for p in out.glob("checkpoint-*[0-9]")) == ["checkpoint-12", "checkpoint-8"]
