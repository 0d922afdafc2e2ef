"""The streaming merge (finetune.training.merge): equal to peft's ``merge_and_unload()``, sharded output, full runs from
sharded directories, no silent partial merge, peft fallback, and peak memory bounded by the output's size."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor

from finetune.config import MergeConfig
from finetune.training.merge import LoraPair, merge
from paligemma.checkpoint import (
    TinyConfig,
    build_processor,
    build_tiny_model,
    build_tokenizer,
    hub_tensors,
    save_checkpoint,
    set_config_dtype,
)
from paligemma.shards import INDEX_FILE, ShardedWriter, checkpoint_files, iter_checkpoint_tensors, read_header

REPO = Path(__file__).resolve().parents[2]
LANGUAGE = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
EVERYWHERE = r".*(language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)|vision_tower.*\.(out_proj|fc1)|multi_modal_projector\.linear)"  # noqa: E501
ADAPTERS: dict[str, dict[str, Any]] = {
    # rank and alpha patterns, vision tower and projector targets too
    "patterns": {
        "r": 8,
        "lora_alpha": 16,
        "target_modules": EVERYWHERE,
        "rank_pattern": {"q_proj": 4},
        "alpha_pattern": {"down_proj": 5},
    },
    "rslora": {"r": 4, "lora_alpha": 8, "target_modules": LANGUAGE, "use_rslora": True},
}


def _random_adapter(base: Path, out: Path, seed: int, **lora: Any) -> tuple[Path, dict[str, torch.Tensor]]:
    """A LoRA adapter far from identity, saved with the processor; plus peft's merged weights (hub names)."""
    from peft import LoraConfig, get_peft_model

    model = PaliGemmaForConditionalGeneration.from_pretrained(str(base), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3)
    peft_model.save_pretrained(out)
    PaliGemmaProcessor.from_pretrained(str(base)).save_pretrained(out)
    merged = peft_model.merge_and_unload()
    return out, {name: tensor.clone() for name, tensor in hub_tensors(merged)}


Adapter = tuple[Path, dict[str, torch.Tensor]]


@pytest.fixture(scope="module")
def adapters(varied_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Adapter]:
    root = tmp_path_factory.mktemp("adapters")
    return {kind: _random_adapter(varied_checkpoint, root / kind, seed=3, **lora) for kind, lora in ADAPTERS.items()}


@pytest.fixture
def adapter(adapters: dict[str, Adapter]) -> Adapter:
    return adapters["patterns"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_streaming_merge_equals_peft(
    adapters: dict[str, Adapter],
    kind: str,
    dtype: str,
    varied_checkpoint: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    adapter_dir, reference = adapters[kind]
    with caplog.at_level(logging.WARNING, logger="finetune.training.merge"):
        out = merge(MergeConfig(run=str(adapter_dir), out=str(tmp_path / "merged"), dtype=dtype))
    assert "peft merge_and_unload" not in caplog.text  # the streaming path, not the fallback
    assert [p.name for p in checkpoint_files(out)] == ["model.safetensors"]
    got = dict(iter_checkpoint_tensors(out))
    assert sorted(got) == sorted(reference)
    torch_dtype = getattr(torch, dtype)
    for name, tensor in got.items():
        assert tensor.dtype == torch_dtype, name
        torch.testing.assert_close(tensor, reference[name].to(torch_dtype), msg=name)
    base = dict(iter_checkpoint_tensors(varied_checkpoint))
    changed = sum(not torch.equal(base[name], reference[name]) for name in reference)
    assert changed >= 14  # the adapter did change the targeted weights

    # the files beside the weights are those the model-based save writes
    again = tmp_path / "reference"
    model = PaliGemmaForConditionalGeneration.from_pretrained(str(varied_checkpoint), dtype=torch.float32)
    save_checkpoint(model, PaliGemmaProcessor.from_pretrained(str(adapter_dir)), again, dtype=torch_dtype)
    for name in ("config.json", "generation_config.json", "tokenizer_config.json", "processor_config.json"):
        assert json.loads((out / name).read_text()) == json.loads((again / name).read_text()), name
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype

    loaded, info = PaliGemmaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_sharded_merge_and_a_full_run_from_shards(
    adapter: Adapter, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    adapter_dir, reference = adapter
    single = merge(MergeConfig(run=str(adapter_dir), out=str(tmp_path / "single"), dtype="float32"))
    sharded = merge(
        MergeConfig(run=str(adapter_dir), out=str(tmp_path / "sharded"), dtype="float32"), max_shard_bytes=1 << 20
    )
    files = checkpoint_files(sharded)
    assert len(files) > 2 and not (sharded / "model.safetensors").exists()
    assert [f.name for f in files][0] == f"model-00001-of-{len(files):05d}.safetensors"
    for f in files:  # a shard holds at most 1 MiB of tensors, or a single larger one
        header = read_header(f)
        data = max(end for k, v in header.items() if k != "__metadata__" for end in v["data_offsets"])
        assert data <= 1 << 20 or len(header) == 2, f.name
    assert dict(iter_checkpoint_tensors(sharded)).keys() == load_file(str(single / "model.safetensors")).keys()
    loaded, info = PaliGemmaForConditionalGeneration.from_pretrained(sharded, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    from_single = PaliGemmaForConditionalGeneration.from_pretrained(single)
    for (name, a), (_, b) in zip(loaded.state_dict().items(), from_single.state_dict().items(), strict=True):
        assert torch.equal(a, b), name

    # a full run whose model/ is sharded: resolved, hashed, cast, and idempotent
    run = tmp_path / "run"
    shutil.copytree(sharded, run / "model")
    (run / "train_config.json").write_text(json.dumps({"method": "full"}))
    cfg = MergeConfig(run=str(run), out=str(tmp_path / "full"), dtype="bfloat16")
    full = merge(cfg)
    assert [p.name for p in checkpoint_files(full)] == ["model.safetensors"]
    single_tensors = dict(iter_checkpoint_tensors(single))
    for name, tensor in iter_checkpoint_tensors(full):
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, single_tensors[name].bfloat16()), name
    info_json = json.loads((full / "merge_info.json").read_text())
    assert info_json["method"] == "full" and len(info_json["weights_sha256"]) == 64
    with caplog.at_level(logging.INFO, logger="finetune.training.merge"):
        merge(cfg)
    assert "already holds this merge" in caplog.text
    # re-saving single over sharded (and back) leaves no stale files
    merge(MergeConfig(run=str(run), out=str(sharded), dtype="float32"))
    assert sorted(p.name for p in sharded.glob("model*")) == ["model.safetensors"]
    assert not (sharded / INDEX_FILE).exists()


def test_an_adapter_tensor_without_a_base_weight_raises(adapter: Adapter, tmp_path: Path) -> None:
    adapter_dir, _ = adapter
    broken = tmp_path / "broken"
    shutil.copytree(adapter_dir, broken)
    tensors = load_file(str(broken / "adapter_model.safetensors"))
    extra = "base_model.model.model.language_model.layers.7.self_attn.q_proj"  # the base has 2 layers
    (a_key,) = [k for k in tensors if k.endswith("layers.0.self_attn.q_proj.lora_A.weight")]
    tensors[f"{extra}.lora_A.weight"] = tensors[a_key].clone()
    tensors[f"{extra}.lora_B.weight"] = tensors[a_key.replace("lora_A", "lora_B")].clone()
    save_file(tensors, str(broken / "adapter_model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"found no weight in the base checkpoint.*layers\.7\.self_attn\.q_proj"):
        merge(MergeConfig(run=str(broken), out=str(out)))
    assert not list(out.glob("*safetensors*")) and not list(out.glob(".shard-*")), list(out.iterdir())
    assert not (out / "merge_info.json").exists()


def test_dora_falls_back_to_peft(varied_checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    adapter_dir, reference = _random_adapter(
        varied_checkpoint, tmp_path / "dora", seed=4, r=4, lora_alpha=8, target_modules=LANGUAGE, use_dora=True
    )
    with caplog.at_level(logging.WARNING, logger="finetune.training.merge"):
        out = merge(MergeConfig(run=str(adapter_dir), out=str(tmp_path / "merged"), dtype="float32"))
    assert "use_dora" in caplog.text
    for name, tensor in iter_checkpoint_tensors(out):
        torch.testing.assert_close(tensor, reference[name], msg=name)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_block_merge_matches_the_formula(fan_in_fan_out: bool) -> None:
    torch.manual_seed(0)
    a, b = torch.randn(4, 40), torch.randn(24, 4)
    delta = (b @ a).T if fan_in_fan_out else b @ a
    weight = torch.randn(delta.shape).bfloat16()
    pair = LoraPair(a, b, scale=0.7, fan_in_fan_out=fan_in_fan_out, module="m")
    assert pair.delta_shape() == tuple(delta.shape)
    merged = pair.merge_into(weight.clone(), torch.float32, block_elements=100)  # several blocks of rows
    torch.testing.assert_close(merged, weight.float() + delta * 0.7)
    in_place = weight.clone()
    assert pair.merge_into(in_place, torch.bfloat16, block_elements=100) is in_place
    torch.testing.assert_close(in_place, (weight.float() + delta * 0.7).bfloat16())


# --- peak memory -------------------------------------------------------------------------------------------

REAL_WIDTH = TinyConfig(
    image_size=224,
    vision_hidden=1152,
    vision_layers=1,
    vision_heads=16,
    text_hidden=2048,
    text_layers=1,
    text_heads=8,
    text_kv_heads=1,
    head_dim=256,
    intermediate=16384,
)
"""PaliGemma 1 3B's widths (TinyConfig has one intermediate size: the text's 16,384 for the vision MLP
too), one block each, the tiny tokenizer's vocabulary: 0.16 B parameters."""

MEASURE = """
import json, resource, sys
sys.path.insert(0, sys.argv[1])
import safetensors, torch, transformers  # noqa: F401 - imports are not the merge's memory
from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor  # noqa: F401
from finetune.config import MergeConfig
from finetune.training.merge import merge
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
merge(MergeConfig(run=sys.argv[2], base=sys.argv[3], out=sys.argv[4], dtype="bfloat16"))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before": before * 1024, "after": after * 1024}))
"""


def measure_merge_peak(root: Path, adapter: Path, base: Path, out: Path) -> int:
    """Growth of peak RSS (bytes) while ``root``'s ``merge`` runs in a fresh interpreter."""
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "2"}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(MEASURE), str(root), str(adapter), str(base), str(out)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=600,
    )
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    return int(figures["after"]) - int(figures["before"])


@pytest.fixture(scope="module")
def real_width(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A bf16 real-width shallow base (bf16 as the hub's checkpoints are) and a LoRA adapter (r 8) on its
    language model. The shapes come from a model built on the meta device and the weights are drawn
    directly (transformers' init of 0.16 B parameters takes longer than the merge)."""
    from peft import LoraConfig

    root = tmp_path_factory.mktemp("real-width")
    processor = build_processor(build_tokenizer(), REAL_WIDTH.image_size, REAL_WIDTH.image_seq_length)
    with torch.device("meta"):
        model = build_tiny_model(processor.tokenizer, REAL_WIDTH, seed=0)
    generator = torch.Generator().manual_seed(0)
    base = root / "base"
    with ShardedWriter(base) as writer:
        for name, meta in hub_tensors(model):
            writer.add(name, torch.randn(meta.shape, generator=generator).mul_(0.02).bfloat16())
    set_config_dtype(model.config, torch.bfloat16)
    model.config.architectures = ["PaliGemmaForConditionalGeneration"]
    model.config.save_pretrained(base)
    processor.save_pretrained(base)

    adapter = root / "adapter"
    LoraConfig(r=8, lora_alpha=16, target_modules=LANGUAGE).save_pretrained(str(adapter))
    lora = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and re.fullmatch(LANGUAGE, name):
            lora[f"base_model.model.{name}.lora_A.weight"] = torch.randn(8, module.in_features, generator=generator)
            lora[f"base_model.model.{name}.lora_B.weight"] = torch.randn(module.out_features, 8, generator=generator)
    assert len(lora) == 14
    save_file(lora, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    return base, adapter


def test_merge_peak_memory_is_bounded_by_the_output(real_width: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = real_width
    out = tmp_path / "merged"
    growth = measure_merge_peak(REPO, adapter, base, out)
    size = sum(f.stat().st_size for f in checkpoint_files(out))
    assert size > 250e6  # real widths: the figure means something
    assert growth <= 1.5 * size, f"merge grew peak RSS by {growth / 2**20:.0f} MiB for {size / 2**20:.0f} MiB"
