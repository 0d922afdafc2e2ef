"""Finetuning trains PaliGemma 2 with every text layer global, as big_vision did (paligemma/attention.py).

A tiny Gemma 2 checkpoint whose sliding window (16) is shorter than one training example (64 image
tokens + prompt + answer): the model ``finetune.training.train.load_model`` builds has no sliding layer and computes
the same loss as the same weights with a window longer than any sequence; ``--keep-sliding-window``
keeps the checkpoint's window, and the loss then differs (the window is really in play).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from finetune.config import TrainConfig

WINDOW = 16


@pytest.fixture(scope="module")
def windowed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(window 16, the same weights with a window of 4096 = unbounded here)."""
    from paligemma.checkpoint import TinyConfig, build_tiny_checkpoint

    root = tmp_path_factory.mktemp("gemma2-window")
    short = build_tiny_checkpoint(
        root / "short", seed=0, cfg=TinyConfig(text_model="gemma2", sliding_window=WINDOW, init_std=0.3)
    )
    wide = Path(shutil.copytree(short, root / "wide"))
    config = json.loads((wide / "config.json").read_text())
    config["text_config"]["sliding_window"] = 4096
    (wide / "config.json").write_text(json.dumps(config))
    return short, wide


def _load(base: Path, out: Path, shapes: Path, **overrides: Any) -> tuple[Any, Any]:
    from finetune.training.model import load_model

    cfg = TrainConfig(base=str(base), out=str(out), vqa=(str(shapes / "vqa.jsonl"),), **overrides)
    return load_model(cfg)


def _windows(model: Any) -> list[int | None]:
    """Each text layer's sliding window as its attention module holds it (None: global)."""
    return [m.sliding_window for n, m in model.named_modules() if "language_model" in n and n.endswith("self_attn")]


def _loss(model: Any, processor: Any) -> float:
    import torch
    from PIL import Image

    batch = processor(
        text=["<image>detect circle"],
        images=[Image.new("RGB", (112, 112), (200, 30, 30))],
        suffix=["<loc0073><loc0174><loc0566><loc0639> circle ; <loc0100><loc0200><loc0300><loc0400> square"],
        return_tensors="pt",
    )
    assert batch["input_ids"].shape[1] > 4 * WINDOW
    with torch.no_grad():
        return float(model.eval()(**batch).loss)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_training_model_has_every_text_layer_global(
    windowed: tuple[Path, Path], shapes: Path, tmp_path: Path, method: str
) -> None:
    short, wide = windowed
    model, processor = _load(short, tmp_path / "global", shapes, method=method)
    windows = _windows(model)
    assert len(windows) == 2 and windows == [None, None]
    text_config = model.config.text_config if method == "full" else model.base_model.model.config.text_config
    assert text_config.layer_types == ["full_attention", "full_attention"]
    unbounded, _ = _load(wide, tmp_path / "wide", shapes, method=method, keep_sliding_window=True)
    assert _windows(unbounded) == [4096, None]  # the checkpoint's own window, longer than any sequence
    assert _loss(model, processor) == pytest.approx(_loss(unbounded, processor), rel=1e-5)


def test_keep_sliding_window_keeps_the_checkpoints_window(
    windowed: tuple[Path, Path], shapes: Path, tmp_path: Path
) -> None:
    short, wide = windowed
    kept, processor = _load(short, tmp_path / "kept", shapes, keep_sliding_window=True)
    assert _windows(kept) == [WINDOW, None]
    unbounded, _ = _load(wide, tmp_path / "wide", shapes, keep_sliding_window=True)
    assert abs(_loss(kept, processor) - _loss(unbounded, processor)) > 1e-3
