"""Merge equivalence (the peft recipe), hub key layout, idempotence, dtype, and vLLM loading the result."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor

from finetune.config import MergeConfig
from finetune.data.collate import PaliGemmaCollator
from finetune.training.merge import merge
from finetune.training.model import LANGUAGE_MODEL_PATTERN
from paligemma.checkpoint import save_checkpoint
from tests.vllm_smoke import assert_vllm_generates

HUB_PREFIXES = ("vision_tower.vision_model.", "multi_modal_projector.", "language_model.model.")


def _batch(processor: PaliGemmaProcessor) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)) for _ in range(2)]
    items = [
        {"image": images[0], "prefix": "detect circle", "suffix": "<loc0100><loc0200><loc0300><loc0400> circle"},
        {"image": images[1], "prefix": "answer en how many shapes are there?", "suffix": "two"},
    ]
    return PaliGemmaCollator(processor)(items)


def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**{k: v for k, v in batch.items() if k != "labels"}).logits


@pytest.fixture(scope="module")
def lora_run(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A saved adapter whose LoRA weights are random (not identity), plus reference logits."""
    from peft import LoraConfig, get_peft_model

    run = tmp_path_factory.mktemp("run")
    processor = PaliGemmaProcessor.from_pretrained(tiny_checkpoint)
    base = PaliGemmaForConditionalGeneration.from_pretrained(str(tiny_checkpoint.resolve()))
    batch = _batch(processor)
    base_logits = _logits(base, batch)
    torch.manual_seed(0)
    pattern = LANGUAGE_MODEL_PATTERN.format("q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj")
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=pattern, init_lora_weights=False))
    peft_logits = _logits(peft_model, batch)
    peft_model.merge_adapter()
    assert torch.allclose(_logits(peft_model, batch), peft_logits, atol=1e-4, rtol=1e-4)  # merge_adapter
    peft_model.unmerge_adapter()
    assert torch.allclose(_logits(peft_model, batch), peft_logits, atol=1e-4, rtol=1e-4)  # and back
    peft_model.save_pretrained(run / "adapter")
    processor.save_pretrained(run / "adapter")
    (run / "train_config.json").write_text(json.dumps({"method": "lora", "base": str(tiny_checkpoint.resolve())}))
    return run, {"batch": batch, "base": base_logits, "peft": peft_logits}  # type: ignore[dict-item]


def test_merged_logits_equal_adapter_logits(lora_run: tuple[Path, dict], tmp_path: Path) -> None:
    run, ref = lora_run
    out = merge(MergeConfig(run=str(run), out=str(tmp_path / "merged"), dtype="float32"))
    merged, info = PaliGemmaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not any("lora" in name for name, _ in merged.named_parameters())  # no BaseTunerLayer left
    logits = _logits(merged, ref["batch"])
    assert torch.allclose(logits, ref["peft"], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(logits, ref["base"], atol=1e-3)  # the adapter did change the model
    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        keys = list(fh.keys())
    assert keys and all(k.startswith(HUB_PREFIXES) for k in keys), [k for k in keys if not k.startswith(HUB_PREFIXES)]
    assert {"tokenizer.json", "processor_config.json", "config.json", "merge_info.json"} <= {
        p.name for p in out.iterdir()
    }

    again = tmp_path / "again"  # save -> load round trip is exact
    save_checkpoint(merged, PaliGemmaProcessor.from_pretrained(out), again)
    reloaded = PaliGemmaForConditionalGeneration.from_pretrained(again)
    assert torch.equal(_logits(reloaded, ref["batch"]), logits)


def test_merge_is_idempotent_and_honours_dtype(
    lora_run: tuple[Path, dict], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run, _ = lora_run
    cfg = MergeConfig(run=str(run / "adapter"), out=str(tmp_path / "m"), dtype="bfloat16")
    out = merge(cfg)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="finetune.training.merge"):
        assert merge(cfg) == out
    assert "already holds this merge" in caplog.text
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.bfloat16}  # noqa: SIM118 - not a dict
    merge(MergeConfig(run=str(run), out=str(out), dtype="float32"))  # another dtype merges again
    assert json.loads((out / "merge_info.json").read_text())["dtype"] == "float32"


def test_merge_without_an_adapter_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="--run"):
        merge(MergeConfig(run=str(tmp_path), out=str(tmp_path / "out")))


@pytest.mark.vllm
def test_vllm_loads_the_merged_checkpoint(lora_run: tuple[Path, dict], tmp_path: Path) -> None:
    run, _ = lora_run
    assert_vllm_generates(merge(MergeConfig(run=str(run), out=str(tmp_path / "merged"), dtype="float32")))
