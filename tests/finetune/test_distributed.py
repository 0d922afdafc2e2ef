"""Training on several processes, shown equal to one: ``torchrun --nproc_per_node 2`` with batch B trains the
weights one process trains with batch 2B (CPU, gloo). The Trainer shards each global batch of the shared,
seeded shuffle across the ranks and weights the loss by the label tokens of the whole global batch, so
only float summation order differs. A sampler shuffled per rank (``tests/finetune/wrong_sampler.py``, the
classic bug) lands far outside the tolerance, so the test tells the two apart. Only rank 0 writes files
and the summary; every log line names its rank.

FSDP: accelerate runs it only on GPUs and would quietly train plain data parallel on the CPU, so ``train``
refuses that launch and says why. What is ours, the shipped config's per-layer wrap policy and the gathered
save, is checked with torch's FSDP2 on gloo (``tests/finetune/fsdp_probe.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-5
"""Largest weight difference accepted between 1 and 2 processes. Seen: 1.5e-8 (float summation order) on
one CPU, 1.9e-6 on an AMD EPYC (other kernels, same code); the per-rank shuffle gives 1e-2, on weights of
about 0.1."""


def _run(launcher: list[str], args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launcher, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _train(base: Path, data: Path, out: Path, batch_size: int, dropout: str = "0") -> list[str]:
    return [
        "train", "--base", str(base), "--out", str(out), "--coco", str(data / "annotations.json"),
        "--batch-size", str(batch_size), "--max-steps", "6", "--lora-dropout", dropout, "--lr", "1e-3",
        "--logging-steps", "1", "--save-steps", "3", "--threads", "1", "--seed", "3",
    ]  # fmt: skip


def _largest_difference(a: Path, b: Path) -> float:
    x, y = (load_file(p / "adapter" / "adapter_model.safetensors") for p in (a, b))
    assert x.keys() == y.keys()
    return max(float((x[k] - y[k]).abs().max()) for k in x)


def test_two_processes_train_what_one_process_trains(tiny_checkpoint: Path, shapes: Path, tmp_path: Path) -> None:
    one = _run([sys.executable, "-m", "finetune"], _train(tiny_checkpoint, shapes, tmp_path / "one", 4))
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run([*TORCHRUN, "-m", "finetune"], _train(tiny_checkpoint, shapes, tmp_path / "two", 2))
    assert two.returncode == 0, two.stderr[-3000:]
    assert _largest_difference(tmp_path / "one", tmp_path / "two") < TOLERANCE

    assert "rank 0/2" in two.stderr and "rank 1/2" in two.stderr
    assert two.stderr.count("finetune: trained:") == 1 and "rank 0/2 finetune: trained:" in two.stderr
    assert (tmp_path / "two" / "checkpoint-6" / "sealed.json").is_file()
    sealed = (tmp_path / "two" / "checkpoint-6" / "sealed.json").read_text()
    assert "rng_state_0.pth" in sealed and "rng_state_1.pth" in sealed  # both ranks had written when sealed

    wrong = _run([*TORCHRUN, "-m", "tests.finetune.wrong_sampler"], _train(tiny_checkpoint, shapes, tmp_path / "w", 2))
    assert wrong.returncode == 0, wrong.stderr[-3000:]
    assert _largest_difference(tmp_path / "one", tmp_path / "w") > 100 * TOLERANCE


def test_fsdp_on_the_cpu_is_refused_with_the_reason(tiny_checkpoint: Path, shapes: Path, tmp_path: Path) -> None:
    config = ROOT / "deploy" / "accelerate" / "fsdp2.yaml"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "2"]
    args = [*_train(tiny_checkpoint, shapes, tmp_path / "fsdp", 2), "--method", "full"]
    done = _run([*launch, "-m", "finetune"], args)
    assert done.returncode != 0
    assert "error: FSDP needs GPUs" in done.stderr
    assert not (tmp_path / "fsdp" / "model").exists()


@pytest.mark.vllm
def test_the_shipped_fsdp_policy_halves_what_each_rank_holds(
    tiny_checkpoint: Path, shapes: Path, tmp_path: Path
) -> None:
    """``deploy/accelerate/fsdp2.yaml``'s wrap policy applied with FSDP2 in 2 gloo processes (as accelerate
    applies it on GPUs): each rank holds half the parameter bytes, one batch's loss is the one process's, and
    after 3 SGD steps the sharded model, saved as ``train`` saves it, is one hub-layout checkpoint equal to
    the same steps in one process, which transformers and vLLM load."""
    import json

    import torch
    from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor

    from finetune.data.collate import ExampleDataset, PaliGemmaCollator
    from finetune.data.examples import detection_examples
    from finetune.data.loaders import load_coco
    from tests.finetune.fsdp_probe import STEPS
    from tests.vllm_smoke import assert_vllm_generates

    probe = [*TORCHRUN, str(ROOT / "tests" / "finetune" / "fsdp_probe.py")]
    done = _run(probe, [str(tiny_checkpoint), str(shapes), str(tmp_path / "saved")])
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in reports) == [0, 1]
    assert {"SiglipEncoderLayer", "GemmaDecoderLayer"} <= set(reports[0]["wrapped"])
    assert all(r["held"] <= 0.55 * r["whole"] for r in reports), reports  # half, plus unsharded leftovers

    model = PaliGemmaForConditionalGeneration.from_pretrained(tiny_checkpoint)
    examples = ExampleDataset(detection_examples(load_coco(shapes / "annotations.json"), 0, seed=0))
    batch = PaliGemmaCollator(PaliGemmaProcessor.from_pretrained(tiny_checkpoint))([examples[i] for i in range(4)])
    torch.manual_seed(0)
    single = float(model(**batch).loss.detach())
    assert all(abs(r["loss"] - single) < 1e-5 for r in reports), (single, reports)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(STEPS):  # what the two ranks did, in one process
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    saved = PaliGemmaForConditionalGeneration.from_pretrained(tmp_path / "saved")  # one hub-layout checkpoint
    assert saved.state_dict().keys() == model.state_dict().keys()
    difference = max(float((saved.state_dict()[k] - v).abs().max()) for k, v in model.state_dict().items())
    assert difference < TOLERANCE, difference
    assert_vllm_generates(tmp_path / "saved")  # the other engine


@pytest.mark.parametrize("arch", ["paligemma-3b-224", "paligemma2-3b-224"])
def test_the_fsdp_policy_wraps_each_layer_of_paligemma_1_and_2(arch: str) -> None:
    """The failure the config avoids: FULL_SHARD without a per-layer policy shards nothing (one unit)."""
    from paligemma.random_like import meta_model, random_like_config
    from paligemma.variants import get_variant
    from tests.finetune.fsdp_probe import wrap_classes

    model = meta_model(random_like_config(get_variant(arch), layers=2, vision_layers=2))
    names = {c.__name__ for c in wrap_classes(model)}
    decoder = "Gemma2DecoderLayer" if arch.startswith("paligemma2") else "GemmaDecoderLayer"
    assert {"SiglipEncoderLayer", decoder} <= names


@pytest.mark.parametrize("name", ["fsdp2.yaml", "deepspeed-zero3.yaml"])
def test_the_shipped_accelerate_configs_load(name: str) -> None:
    """accelerate's own loader reads them (it refuses unknown keys): the files ``--config_file`` takes."""
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(ROOT / "deploy" / "accelerate" / name))
    assert config.distributed_type.value == ("FSDP" if name.startswith("fsdp") else "DEEPSPEED")
    if name.startswith("fsdp"):
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    else:
        assert config.deepspeed_config["zero_stage"] == 3


def test_two_processes_killed_mid_save_resume_to_the_same_weights(
    tiny_checkpoint: Path, shapes: Path, tmp_path: Path
) -> None:
    """SIGKILL on rank 0 while it writes ``checkpoint-6``, then ``--resume`` on 2 processes: the unsealed
    folder is moved aside once (by rank 0), both ranks resume from ``checkpoint-3``, and the adapter is the
    uninterrupted run's (LoRA dropout on: each rank's RNG state comes back from its own file)."""
    whole = _run([*TORCHRUN, "-m", "finetune"], _train(tiny_checkpoint, shapes, tmp_path / "whole", 2, dropout="0.05"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    args = _train(tiny_checkpoint, shapes, tmp_path / "killed", 2, dropout="0.05")
    killed = _run([*TORCHRUN, "-m", "tests.finetune.interrupt", "save:6"], args)
    assert killed.returncode != 0 and not (tmp_path / "killed" / "adapter").exists()
    resumed = _run([*TORCHRUN, "-m", "finetune"], [*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stderr.count("checkpoint-6 is incomplete") == 1  # one rank moved it aside
    assert resumed.stderr.count(f"resuming from {tmp_path / 'killed' / 'checkpoint-3'} ") == 2
    assert _largest_difference(tmp_path / "whole", tmp_path / "killed") == 0.0
