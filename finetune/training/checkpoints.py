"""Trainer checkpoints that a run killed at any moment can resume from.

The Trainer writes ``checkpoint-N/`` file by file (model, optimizer, scheduler, RNG states, then
``trainer_state.json``) and marks nothing when it is done, so ``--resume`` after a kill during a save would
pick a half-written folder. Here a checkpoint counts only once it is **sealed**: after the Trainer's save
(its ``on_save`` event) every file is flushed to disk and ``sealed.json`` (step, training seconds, each
file's size) is written under a temporary name, flushed and renamed into place, which is atomic. Resume
takes the newest sealed checkpoint whose files still have their recorded sizes; a newer unsealed one is
moved aside to ``checkpoint-N.partial`` with a warning. Old checkpoints are deleted here, after the new one
is sealed (the Trainer's own rotation would run before that), so a safe checkpoint always exists.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState

from finetune.training.callbacks import Budget

log = logging.getLogger(__name__)
SEAL = "sealed.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seal(folder: Path, step: int, seconds: float) -> None:
    """Flush ``folder``'s files to disk, then write ``sealed.json`` atomically (it names every file's size)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != SEAL)
    for path in files:
        _fsync(path)
    record = {
        "step": step,
        "seconds": round(seconds, 2),
        "files": {str(p.relative_to(folder)): p.stat().st_size for p in files},
    }
    tmp = folder / f".{SEAL}.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    _fsync(tmp)
    tmp.rename(folder / SEAL)
    _fsync(folder)


def read_seal(folder: Path) -> dict[str, Any] | None:
    """The seal of a complete checkpoint, or None (no seal, unreadable, or a file missing or resized)."""
    try:
        record: dict[str, Any] = json.loads((folder / SEAL).read_text())
        intact = all((folder / name).stat().st_size == size for name, size in record["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record if intact else None


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``checkpoint-N`` in ``out``, oldest first."""
    found = [(int(m.group(1)), p) for p in out.glob("checkpoint-*") if (m := _NAME.match(p.name)) and p.is_dir()]
    return sorted(found)


def resume_point(out: Path, move_aside: bool = True) -> tuple[Path, dict[str, Any]] | None:
    """The newest sealed checkpoint in ``out`` and its seal; newer unsealed ones are moved aside (by one
    process only: under torchrun the others pass ``move_aside=False`` and find the same checkpoint)."""
    for _, folder in reversed(checkpoints(out)):
        record = read_seal(folder)
        if record is not None:
            return folder, record
        if not move_aside:
            continue
        aside = folder.with_name(folder.name + ".partial")
        shutil.rmtree(aside, ignore_errors=True)
        folder.rename(aside)
        log.warning(
            "%s is incomplete (the run was stopped while writing it, or a file is missing): not resuming from it, "
            "moved to %s",
            folder.name,
            aside.name,
        )
    return None


def rotate(out: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` sealed checkpoints (and unsealed ones older than those)."""
    sealed = [(step, folder) for step, folder in checkpoints(out) if read_seal(folder) is not None]
    if len(sealed) <= keep:
        return
    oldest_kept = sealed[-keep][0]
    for step, folder in checkpoints(out):
        if step < oldest_kept:
            shutil.rmtree(folder)


class SealCheckpoints(TrainerCallback):
    """Seals each checkpoint once the Trainer has written it, then rotates (``--save-total-limit``)."""

    def __init__(self, out: Path, keep: int, budget: Budget) -> None:
        self.out, self.keep, self.budget = out, keep, budget

    def on_save(self, args: Any, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank has written its part (its RNG state) before the seal lists the files
        if state.is_world_process_zero:
            seal(self.out / f"checkpoint-{state.global_step}", state.global_step, self.budget.elapsed())
            rotate(self.out, self.keep)
