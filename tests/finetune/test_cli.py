"""``python -m finetune``: subcommands exist, flags come from the configs, errors name the flag."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.__main__ import build_parser, main


def test_synth_command_writes_the_layout(tmp_path: Path) -> None:
    main(["synth", "--out", str(tmp_path / "s"), "--n", "3", "--seed", "1", "--shapes", "circle,diamond"])
    coco = json.loads((tmp_path / "s" / "annotations.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["circle", "diamond"]
    assert len(list((tmp_path / "s" / "images").glob("*.png"))) == 3
    assert (tmp_path / "s" / "vqa.jsonl").read_text().count("\n") == 6


def test_every_command_is_there_and_documented() -> None:
    parser = build_parser()
    (commands,) = [a for a in parser._actions if a.dest == "command"]
    expected = {
        "tiny",
        "random-like",
        "synth",
        "mask-codebook",
        "train",
        "merge",
        "eval",
        "demo",
        "lora-demo",
        "segment-demo",
    }
    assert set(commands.choices) == expected  # type: ignore[arg-type]
    lora_help = commands.choices["lora-demo"].format_help()  # type: ignore[index]
    assert "--new-class" in lora_help and "--old-images" in lora_help and "--steps" in lora_help
    train_help = commands.choices["train"].format_help()  # type: ignore[index]
    assert "--max-minutes" in train_help and "Wall-clock safety stop" in train_help
    assert "--decay-steps" in train_help and "--snapshot-steps" in train_help
    assert "--freeze-vision" in train_help and "--no-freeze-vision" in train_help


def test_config_errors_end_cleanly_with_the_flag(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--base is required"):
        main(["train", "--out", str(tmp_path), "--vqa", "x.jsonl"])
    with pytest.raises(SystemExit, match="nothing to evaluate"):
        main(["eval", "--model", "m", "--out", str(tmp_path)])


def test_repeatable_flags_become_tuples() -> None:
    from finetune.config import TrainConfig
    from finetune.options import from_args

    args = build_parser().parse_args(
        ["train", "--base", "b", "--out", "o", "--coco", "a.json", "--coco", "b.json", "--lora-targets", "q_proj"]
    )
    cfg = from_args(TrainConfig, args)
    assert cfg.coco == ("a.json", "b.json") and cfg.lora_targets == ("q_proj",) and cfg.vqa == ()
    assert cfg.method == "lora" and cfg.freeze_vision is False


def test_a_max_length_without_room_for_the_image_is_refused_before_training(
    tiny_checkpoint: Path, shapes: Path, tmp_path: Path
) -> None:
    """The tiny checkpoint has 64 image tokens: 60 cannot hold one prompt, and the message names the flag
    and the length that would (a real 224-px checkpoint has 256; the old default of 256 crashed in the tokenizer)."""
    args = ["train", "--base", str(tiny_checkpoint), "--out", str(tmp_path / "run"), "--coco"]
    args += [str(shapes / "annotations.json"), "--max-steps", "1", "--max-length", "60"]
    with pytest.raises(
        SystemExit,
        match=r"--max-length 60 leaves no room for an answer: the longest prompt is \d+ "
        r"tokens \(64 image tokens",
    ):
        main(args)
    assert not (tmp_path / "run" / "checkpoint-1").exists()
