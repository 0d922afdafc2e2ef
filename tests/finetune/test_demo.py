"""The CPU benchmark's wiring, on a few images and seconds: every stage trains, the report and pictures exist."""

from __future__ import annotations

import json
from pathlib import Path

from finetune.demo import DemoConfig, run_demo


def test_demo_runs_the_curriculum_and_reports(tmp_path: Path) -> None:
    cfg = DemoConfig(
        out=str(tmp_path / "model"), report=str(tmp_path / "report"), work=str(tmp_path / "work"),
        train_images=16, one_shape_images=16, heldout_images=6, max_minutes=0.3, shape_minutes=0.05,
        one_shape_minutes=0.05, curve_minutes=(0.05, 0.12), curve_images=4, pictures=2, batch_size=4, threads=2,
    )  # fmt: skip
    report = run_demo(cfg)

    assert [s["name"] for s in report["stages"]] == ["shape questions", "one shape", "1-4 shapes"]
    assert report["stages"][2]["minutes"] == 0.3 - 0.05 - 0.05
    assert [s["decay_minutes"] for s in report["stages"]] == [0.0, 0.0, 0.3 - 0.05 - 0.05]  # capped to the stage
    assert report["model_shape"]["sinusoid_locs"] is True
    work = tmp_path / "work"
    for number in (1, 2, 3):
        assert json.loads((work / f"run-{number}" / "train_result.json").read_text())["steps"] >= 1
    curve = json.loads((tmp_path / "report" / "learning_curve.json").read_text())
    assert {p["stage"] for p in curve["loss"]} <= {1, 2, 3}
    steps = [p["step"] for p in curve["loss"]]
    assert steps == sorted(steps)  # stages continue each other's step count
    assert [p.get("minute") for p in curve["heldout"]] == [0.05, 0.12, None]  # 0.05: a stage boundary
    assert curve["heldout"][-1]["step"] == report["training"]["steps"]
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert (tmp_path / "report" / "learning_curve.png").is_file()
    assert len(list((tmp_path / "report" / "pictures").glob("*.png"))) >= 2
    held = report["heldout"]
    assert held["detection"]["images"] == 6 and 0.0 <= held["vqa"]["accuracy"] <= 1.0
    assert {"mean_box", "majority_answer"} <= set(report["baselines"])
    one_shape = json.loads((work / "one-shape" / "annotations.json").read_text())
    assert len(one_shape["annotations"]) == 16  # one shape per image

    again = run_demo(cfg)  # cached: nothing trains, the saved report comes back
    assert again == json.loads((tmp_path / "report" / "report.json").read_text())
