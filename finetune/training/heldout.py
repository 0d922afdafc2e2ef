"""Held-out scores while training: mAP@0.5 and VQA accuracy of the model being trained, on the learning curve.

The scores come from the project's own evaluation (:func:`finetune.evaluation.evaluate.evaluate`) through the
service's transformers engine (:class:`service.engines.hf_engine.HFEngine`) wrapped around the live model,
so they are the numbers ``python -m finetune eval`` gives for the same weights, without saving or merging
anything. :class:`HeldOutTrainer` plugs them into the Trainer's own evaluation hook: they are logged as
``eval_map_50`` / ``eval_vqa_accuracy`` (TensorBoard: ``eval/map_50``), written to ``learning_curve.json``
(:class:`finetune.training.callbacks.Curve`), and with ``--keep-best`` the best-scoring model is saved to ``best/``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import Trainer

from finetune.config import TrainConfig
from finetune.data.loaders import load_coco, load_vqa
from finetune.data.records import DetectionSet, VQARecord
from finetune.training.callbacks import save_trained

log = logging.getLogger(__name__)
BEST = "best"


@dataclass
class HeldOut:
    """Held-out detection images and/or VQA questions (what ``--eval-coco`` / ``--eval-vqa`` name)."""

    detection: DetectionSet | None
    vqa: list[VQARecord] | None

    def __len__(self) -> int:
        return len(self.detection.images if self.detection else []) + len(self.vqa or [])

    @property
    def metric(self) -> str:
        """The score ``--keep-best`` follows: detection mAP@0.5 when there is detection data, else VQA accuracy."""
        return "eval_map_50" if self.detection is not None else "eval_vqa_accuracy"


def load_heldout(cfg: TrainConfig) -> HeldOut | None:
    """The held-out data of ``cfg`` (None without ``--eval-coco``/``--eval-vqa``), cut to ``--eval-limit``."""
    if not (cfg.eval_coco or cfg.eval_vqa):
        return None
    detection = None
    if cfg.eval_coco:
        detection = load_coco(cfg.eval_coco, cfg.eval_coco_images, synonyms=cfg.synonym_map, on_error=cfg.on_error)
        detection.images = detection.images[: cfg.eval_limit]
    vqa = load_vqa(cfg.eval_vqa, on_error=cfg.on_error)[: cfg.eval_limit] if cfg.eval_vqa else None
    return HeldOut(detection, vqa)


async def _scores(model: Any, processor: Any, heldout: HeldOut, batch_size: int) -> dict[str, float]:
    from finetune.evaluation.evaluate import evaluate
    from service.engines.hf_engine import HFEngine

    engine = HFEngine(model, processor, model_name="training", max_batch_size=batch_size, max_queue_size=1_000_000)
    engine.start()
    try:
        report = await evaluate(engine, detection=heldout.detection, vqa=heldout.vqa, concurrency=batch_size)
    finally:
        await engine.aclose()
    scores: dict[str, float] = {}
    if "detection" in report:
        scores.update(map_50=report["detection"]["map_50"], map=report["detection"]["map"])
    if "vqa" in report:
        scores["vqa_accuracy"] = report["vqa"]["accuracy"]
    return scores


def heldout_scores(model: Any, processor: Any, heldout: HeldOut, batch_size: int = 8) -> dict[str, float]:
    """Score ``model`` (a model or peft model, left in the mode it was in) on ``heldout``."""
    training = model.training
    model.eval()
    try:
        return asyncio.run(_scores(model, processor, heldout, batch_size))
    finally:
        model.train(training)


class HeldOutTrainer(Trainer):
    """The Trainer whose evaluation is :func:`heldout_scores` (``--eval-steps``), optionally keeping the best
    model in ``best_dir`` (``best/best.json`` names its step and score, and survives ``--resume``)."""

    def __init__(self, *, heldout: HeldOut, processor: Any, best_dir: Path | None, **kwargs: Any) -> None:
        super().__init__(eval_dataset=heldout, **kwargs)  # scored by evaluate() below
        self.heldout, self.scoring_processor, self.best_dir = heldout, processor, best_dir
        self.scored_step = -1
        """The step last scored (the Trainer scores every ``eval_steps`` and at ``max_steps``)."""

    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        metrics: dict[str, float] = {}
        self.scored_step = self.state.global_step
        if self.is_world_process_zero():
            model = self.accelerator.unwrap_model(self.model)
            batch = self.args.per_device_eval_batch_size
            scores = heldout_scores(model, self.scoring_processor, self.heldout, batch)
            metrics = {f"{metric_key_prefix}_{k}": v for k, v in scores.items()}
            log.info("held-out at step %d: %s", self.state.global_step, _describe(metrics))
            self._keep_if_best(model, metrics)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _keep_if_best(self, model: Any, metrics: dict[str, float]) -> None:
        if self.best_dir is None:
            return
        metric, value = self.heldout.metric, metrics[self.heldout.metric]
        best = read_best(self.best_dir)
        if best is not None and best["value"] >= value:
            return
        tmp = self.best_dir.with_name(self.best_dir.name + ".tmp")  # replaced whole: never half old, half new
        shutil.rmtree(tmp, ignore_errors=True)
        save_trained(model, self.scoring_processor, tmp)
        record = {"step": self.state.global_step, "metric": metric, "value": value}
        (tmp / "best.json").write_text(json.dumps(record) + "\n")
        shutil.rmtree(self.best_dir, ignore_errors=True)
        tmp.rename(self.best_dir)
        log.info("new best %s %.4f at step %d: saved to %s", metric, value, self.state.global_step, self.best_dir)


def read_best(best_dir: Path) -> dict[str, Any] | None:
    """``best.json`` of the kept model: ``{"step", "metric", "value"}`` (None before the first evaluation). A
    run stopped between deleting the old ``best/`` and renaming the new one into place left it in ``best.tmp``."""
    tmp = best_dir.with_name(best_dir.name + ".tmp")
    if not best_dir.is_dir() and (tmp / "best.json").is_file():
        tmp.rename(best_dir)
    record = best_dir / "best.json"
    return dict(json.loads(record.read_text())) if record.is_file() else None


def _describe(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in metrics.items())
