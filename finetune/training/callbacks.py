"""The training run's own Trainer callbacks: the clock (and its safety stop), the learning curve, snapshots.

Each survives ``--resume``: the clock goes on from the seconds recorded with the checkpoint, and the curve
keeps its points up to the step resumed from (those after it are trained again), so a resumed run's
``learning_curve.json`` reads like an uninterrupted one's.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from transformers import ProgressCallback, TrainerCallback, TrainerControl, TrainerState

from finetune.options import flag
from paligemma.checkpoint import save_checkpoint

log = logging.getLogger(__name__)


class Budget(TrainerCallback):
    """The wall-clock safety stop: ends training once ``minutes`` of training time have passed (the run
    then saves as usual). Also the clock that the learning curve, snapshots and checkpoints report;
    ``already``: the seconds trained before a resume."""

    def __init__(self, minutes: float | None, already: float = 0.0) -> None:
        self.minutes, self.already = minutes, already
        self.start = time.monotonic()

    def on_train_begin(self, args: Any, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self.start = time.monotonic()

    def on_step_end(self, args: Any, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if self.minutes is not None and self.elapsed() >= self.minutes * 60:
            log.warning(
                "%s of %.1f min reached at step %d of %d: stopping early",
                flag("max_minutes"),
                self.minutes,
                state.global_step,
                state.max_steps,
            )
            control.should_training_stop = True

    def elapsed(self) -> float:
        return self.already + time.monotonic() - self.start


class BudgetProgress(ProgressCallback):
    """The progress bar of a run with a time budget: it fills with whichever ends the run first, the steps
    or the minutes (with only the steps, a minute-bound run shows an ETA of days)."""

    def __init__(self, budget: Budget) -> None:
        super().__init__()
        self.budget = budget

    def on_train_begin(self, args: Any, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if state.is_world_process_zero:
            form = "{l_bar}{bar}| {n:.0f}/{total} % [{elapsed}<{remaining}{postfix}]"
            self.training_bar = tqdm(total=100, bar_format=form, dynamic_ncols=True)
        self.current_step = 0

    def on_step_end(self, args: Any, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if state.is_world_process_zero and self.training_bar is not None and self.budget.minutes:
            done = max(state.global_step / state.max_steps, self.budget.elapsed() / (self.budget.minutes * 60))
            self.training_bar.set_postfix_str(f"step {state.global_step}", refresh=False)
            self.training_bar.update(min(100.0, 100 * done) - self.training_bar.n)


CURVE_KEYS = ("loss", "grad_norm", "learning_rate", "epoch")


class Curve(TrainerCallback):
    """Writes every logged loss, and every held-out score (``eval_*``), with its step and training seconds
    to ``learning_curve.json``, and draws them in ``learning_curve.png``. ``resumed_at``: keep the points of
    an earlier run up to that step."""

    def __init__(self, path: Path, budget: Budget, resumed_at: int | None = None) -> None:
        self.path, self.budget = path, budget
        self.points: list[dict[str, Any]] = []
        if resumed_at is not None and path.is_file():
            self.points = [p for p in json.loads(path.read_text()) if p["step"] <= resumed_at]

    def on_train_begin(self, args: Any, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if state.is_world_process_zero:  # a run shorter than --logging-steps still has its (empty) curve
            self._write()

    def on_log(self, args: Any, state: TrainerState, control: TrainerControl, logs: Any = None, **kw: Any) -> None:
        if not logs or not state.is_world_process_zero:
            return
        point: dict[str, Any] = {"step": state.global_step, "seconds": round(self.budget.elapsed(), 2)}
        if "loss" in logs:
            point.update({k: logs[k] for k in CURVE_KEYS if k in logs})
        scores = {k: v for k, v in logs.items() if k.startswith("eval_")}
        point.update(scores)
        if len(point) > 2:
            self.points.append(point)
            self._write()
        if scores:
            self.draw()

    def on_train_end(self, args: Any, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if state.is_world_process_zero:
            self.draw()

    def draw(self) -> Path:
        """``learning_curve.png`` beside the JSON: the loss, and the held-out scores on a 0-1 axis."""
        from finetune.training.plot import learning_curve_png

        names = {"eval_map_50": "held-out mAP@0.5", "eval_vqa_accuracy": "held-out VQA accuracy"}
        scores = {
            label: [(p["step"], p[key]) for p in self.points if key in p]
            for key, label in names.items()
            if any(key in p for p in self.points)
        }
        loss = [(p["step"], p["loss"]) for p in self.points if "loss" in p]
        return learning_curve_png(loss, scores, self.path.with_suffix(".png"), title=f"{self.path.parent.name}")

    def _write(self) -> None:
        self.path.write_text(json.dumps(self.points, indent=1) + "\n")


def parameter_bytes(model: Any) -> int:
    """Bytes of the parameters this process holds: its own shards under FSDP (DTensor ``to_local``)."""
    held = 0
    for param in model.parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        held += local.numel() * local.element_size()
    return held


class ParameterBytes(TrainerCallback):
    """Logs, on every rank, how many bytes of parameters that rank holds once the Trainer has wrapped the
    model (DDP: all of them; FSDP: about 1/world size), and keeps rank 0's for ``train_result.json``."""

    def __init__(self) -> None:
        self.held = 0

    def on_train_begin(self, args: Any, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self.held = parameter_bytes(kw["model"])
        log.info("this process holds %.1f MiB of parameters", self.held / 2**20)


class Snapshots(TrainerCallback):
    """Saves the model (full) or adapter after given optimiser steps, for a held-out learning curve."""

    def __init__(self, out: Path, steps: tuple[int, ...], budget: Budget, processor: Any) -> None:
        self.out, self.marks, self.budget, self.processor = out, set(steps), budget, processor

    def on_step_end(self, args: Any, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if state.global_step in self.marks and state.is_world_process_zero:
            path = self.out / f"step-{state.global_step}"
            save_trained(kw["model"], self.processor, path)
            info = {"step": state.global_step, "seconds": round(self.budget.elapsed(), 2)}
            (path / "snapshot.json").write_text(json.dumps(info) + "\n")


def save_trained(model: Any, processor: Any, out: Path, state_dict: dict[str, Any] | None = None) -> Path:
    """Adapter (peft model) or the full model in the hub layout, plus the processor. ``state_dict``: the
    weights of a sharded model, gathered (:func:`gather_if_sharded`)."""
    if hasattr(model, "peft_config"):
        model.save_pretrained(out, state_dict=state_dict)
        processor.save_pretrained(out)
        return out
    return save_checkpoint(model, processor, out, state_dict=state_dict)


def gather_if_sharded(model: Any) -> dict[str, Any] | None:
    """The whole state dict of an FSDP2-sharded model on the first rank's CPU (every rank must call it: the
    gather is collective; the others get an empty dict), or None for a model each rank holds whole."""
    if not any(hasattr(p, "full_tensor") for p in model.parameters()):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state: dict[str, Any] = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    return state
