"""The CPU benchmark's wiring, on a few images and steps: every stage trains exactly its steps, the report,
the model card and the pictures exist, and a snapshot after N steps is what a run of N steps trains."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from finetune.recipes.demo import run_demo
from finetune.recipes.demo_config import DemoConfig


def _config(tmp_path: Path, name: str, **overrides: object) -> DemoConfig:
    values: dict[str, object] = dict(
        out=str(tmp_path / name / "model"), report=str(tmp_path / name / "report"), work=str(tmp_path / name / "work"),
        train_images=16, one_shape_images=16, heldout_images=6, steps=12, shape_steps=2, one_shape_steps=3,
        decay_steps=4, warmup_steps=1, curve_steps=(2, 6), pictures=2, batch_size=4, threads=2,
    )  # fmt: skip
    return DemoConfig(**{**values, **overrides})  # type: ignore[arg-type]


def test_demo_runs_the_curriculum_by_steps_and_reports(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "full")
    report = run_demo(cfg)

    assert [s["name"] for s in report["stages"]] == ["shape questions", "one shape", "1-4 shapes"]
    assert [s["steps"] for s in report["stages"]] == [2, 3, 7]
    assert [s["decay_steps"] for s in report["stages"]] == [0, 0, 4]
    assert report["training"]["steps"] == 12
    assert report["model_shape"]["sinusoid_locs"] is True
    work = tmp_path / "full" / "work"
    assert [json.loads((work / f"run-{n}" / "train_result.json").read_text())["steps"] for n in (1, 2, 3)] == [2, 3, 7]
    curve = json.loads((tmp_path / "full" / "report" / "learning_curve.json").read_text())
    assert {p["stage"] for p in curve["loss"]} <= {1, 2, 3}
    steps = [p["step"] for p in curve["loss"]]
    assert steps == sorted(steps)  # stages continue each other's step count
    assert [p["step"] for p in curve["heldout"]] == [2, 6, 12]  # 2: a stage boundary; 12: the final model
    assert [p["step"] for p in report["curve"]] == [2, 6, 12]
    assert report["curve"][-1]["heldout"] == report["heldout"]
    model = tmp_path / "full" / "model"
    assert (model / "model.safetensors").is_file()
    assert json.loads((model / "report.json").read_text()) == report
    card = (model / "README.md").read_text()
    assert "--steps 12" in card and "| final | 12 |" in card and "| snapshot | 6 |" in card
    assert (tmp_path / "full" / "report" / "learning_curve.png").is_file()
    assert len(list((tmp_path / "full" / "report" / "pictures").glob("*.png"))) >= 2
    held = report["heldout"]
    assert held["detection"]["images"] == 6 and 0.0 <= held["vqa"]["accuracy"] <= 1.0
    assert {"mean_box", "majority_answer"} <= set(report["baselines"])
    one_shape = json.loads((work / "one-shape" / "annotations.json").read_text())
    assert len(one_shape["annotations"]) == 16  # one shape per image

    again = run_demo(cfg)  # cached: nothing trains, the saved report comes back
    assert again == json.loads((tmp_path / "full" / "report" / "report.json").read_text())

    # The recipe's first 6 steps, run on their own (no decay): the same weights as the snapshot after step 6.
    short = run_demo(_config(tmp_path, "short", steps=6, decay_steps=0, curve_steps=()))
    assert short["training"]["steps"] == 6
    snapshot = load_file(work / "run-3" / "snapshots" / "step-1" / "model.safetensors")
    alone = load_file(tmp_path / "short" / "model" / "model.safetensors")
    assert snapshot.keys() == alone.keys()
    assert all(snapshot[k].equal(alone[k]) for k in snapshot)
    for part in ("detection", "vqa"):
        assert short["heldout"][part] == report["curve"][1]["heldout"][part]
