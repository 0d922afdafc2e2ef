"""Held-out scores while training (``--eval-coco``/``--eval-vqa``, ``--eval-steps``, ``--keep-best``) and a
tracker (``--report-to tensorboard``): a short LoRA run on the demo model, which finds real boxes, so its
mAP@0.5 is a real number. The score logged at the last step equals what the project's evaluation gives for
the saved adapter, and TensorBoard's own reader finds the loss and the held-out scores in the event files.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from finetune.config import TrainConfig
from finetune.data.loaders import load_coco, load_vqa
from finetune.data.synth import generate_cached
from finetune.training.train import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def heldout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_cached(tmp_path_factory.mktemp("heldout"), 6, seed=11)


def test_held_out_scores_reach_the_curve_tensorboard_and_best(
    demo_checkpoint: Path, shapes: Path, heldout: Path, tmp_path: Path
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    cfg = TrainConfig(
        base=str(demo_checkpoint), out=str(out), coco=(str(shapes / "annotations.json"),), batch_size=4,
        max_steps=3, lr=1e-3, logging_steps=1, threads=2, seed=0, eval_coco=str(heldout / "annotations.json"),
        eval_vqa=str(heldout / "vqa.jsonl"), eval_steps=2, keep_best=True, report_to=("tensorboard",),
    )  # fmt: skip
    adapter = train(cfg)

    curve = json.loads((out / "learning_curve.json").read_text())
    scored = {p["step"]: p for p in curve if "eval_map_50" in p}
    assert sorted(scored) == [2, 3]  # every --eval-steps, and the last step
    assert all(0 <= p["eval_map_50"] <= 1 and 0 <= p["eval_vqa_accuracy"] <= 1 for p in scored.values())
    assert max(p["eval_map_50"] for p in scored.values()) > 0.1  # the demo model finds shapes

    best = json.loads((out / "best" / "best.json").read_text())
    assert best["metric"] == "eval_map_50"
    assert best["value"] == max(p["eval_map_50"] for p in scored.values())
    assert best["step"] == min(s for s, p in scored.items() if p["eval_map_50"] == best["value"])
    assert (out / "best" / "adapter_model.safetensors").is_file()

    final = _evaluate_adapter(demo_checkpoint, adapter, heldout)
    assert final["detection"]["map_50"] == pytest.approx(scored[3]["eval_map_50"], abs=1e-9)
    assert final["vqa"]["accuracy"] == pytest.approx(scored[3]["eval_vqa_accuracy"], abs=1e-9)

    events = EventAccumulator(str(next((out / "runs").iterdir())))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "eval/map_50", "eval/vqa_accuracy"} <= set(tags)
    assert [e.step for e in events.Scalars("eval/map_50")] == [2, 3]
    assert [e.value for e in events.Scalars("eval/map_50")] == pytest.approx(
        [scored[2]["eval_map_50"], scored[3]["eval_map_50"]]
    )
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]


def _evaluate_adapter(base: Path, adapter: Path, data: Path) -> dict[str, object]:
    """``finetune.evaluation.evaluate`` on the saved adapter, through the service's transformers engine."""
    from peft import PeftModel
    from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor

    from finetune.evaluation.evaluate import evaluate
    from service.engines.hf_engine import HFEngine

    model = PeftModel.from_pretrained(PaliGemmaForConditionalGeneration.from_pretrained(base), str(adapter)).eval()

    async def run() -> dict[str, object]:
        engine = HFEngine(model, PaliGemmaProcessor.from_pretrained(base), model_name="saved", max_batch_size=4)
        engine.start()
        try:
            detection, vqa = load_coco(data / "annotations.json"), load_vqa(data / "vqa.jsonl")
            return await evaluate(engine, detection=detection, vqa=vqa, concurrency=4)
        finally:
            await engine.aclose()

    return asyncio.run(run())


def test_keep_best_needs_held_out_data(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--keep-best needs held-out data"):
        TrainConfig(base="b", out=str(tmp_path), vqa=("v.jsonl",), keep_best=True)
