"""Shard a PaliGemma with FSDP2 on the CPU (gloo) by the wrap policy of ``deploy/accelerate/fsdp2.yaml``, as
accelerate would on GPUs; report what this rank holds and the loss of one batch (JSON on stdout), then
train ``STEPS`` SGD steps (Adam would turn float noise in near-zero gradients into whole steps).

    torchrun --standalone --nproc_per_node 2 tests/finetune/fsdp_probe.py MODEL DATA_DIR OUT

Then it saves the sharded model as ``train`` saves its final model (gathered, written by rank 0) to OUT.

accelerate does not run FSDP on the CPU, so the training command cannot show the sharding here; this
probe shows the part that is ours, the policy: with it, each rank holds about 1/world of the parameters.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3
"""SGD steps (lr 0.1) on one batch before the save."""


def wrap_classes(model: Any) -> set[type]:
    """The module classes the shipped config's policy wraps in ``model`` (accelerate's own resolution)."""
    import yaml
    from accelerate.utils import FullyShardedDataParallelPlugin

    config = yaml.safe_load((ROOT / "deploy" / "accelerate" / "fsdp2.yaml").read_text())["fsdp_config"]
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=config["fsdp_version"], auto_wrap_policy=config["fsdp_auto_wrap_policy"]
    )
    plugin.set_auto_wrap_policy(model)
    return set(plugin.auto_wrap_policy.keywords["transformer_layer_cls"])


def main(model_dir: str, data_dir: str, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor

    from finetune.data.collate import ExampleDataset, PaliGemmaCollator
    from finetune.data.examples import detection_examples
    from finetune.data.loaders import load_coco
    from finetune.training.callbacks import gather_if_sharded, parameter_bytes, save_trained

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = PaliGemmaForConditionalGeneration.from_pretrained(model_dir)
    whole = parameter_bytes(model)
    classes = wrap_classes(model)
    for module in list(model.modules()):
        if isinstance(module, tuple(classes)):
            fully_shard(module)
    fully_shard(model)
    processor = PaliGemmaProcessor.from_pretrained(model_dir)
    examples = ExampleDataset(detection_examples(load_coco(Path(data_dir) / "annotations.json"), 0, seed=0))
    batch = PaliGemmaCollator(processor)([examples[i] for i in range(4)])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # before any forward: the root's params are
    with torch.no_grad():  # registered unsharded after one, and an optimizer built then would hold copies
        first = float(model(**batch).loss)
    for _ in range(STEPS):  # every rank trains on the same batch: the averaged gradient is one process's
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    report = {
        "rank": dist.get_rank(),
        "whole": whole,
        "held": parameter_bytes(model),
        "wrapped": sorted(c.__name__ for c in classes),
        "loss": first,
    }
    sys.stdout.write(json.dumps(report) + "\n")
    gathered = gather_if_sharded(model)
    if dist.get_rank() == 0:
        save_trained(model, processor, Path(out), gathered)
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main(sys.argv[1], sys.argv[2], sys.argv[3])
