"""How often vLLM's CPU backend detects what the faithful transformers engine detects, on a trained model.

    .venv/bin/python -m finetune synth --out artifacts/heldout --n 200 --seed 2   # the demo's held-out set
    .venv/bin/python benchmarks/vllm_cpu_agreement.py --model models/demo \
        --data artifacts/heldout/annotations.json

Stock vLLM's CPU attention backend attends causally over every token, while PaliGemma (and the
transformers engine) gives image + prompt one bidirectional block; the project's prefix-LM plugin
(service/vllm_plugin) restores that block. This measures it on a model trained with the real prefix-LM
objective: an image *agrees* when both engines return the same labels and every vLLM box has a same-label
transformers box with IoU >= 0.9 (one-to-one). It also prints each engine's mAP@0.5 against the ground
truth (docs/engines.md: 100/100 with the plugin, 5/100 without).
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections import Counter
from collections.abc import Sequence

from finetune.data.loaders import load_coco
from finetune.data.records import Box, DetectionSet
from finetune.evaluation.compare import box_iou
from finetune.evaluation.evaluate import open_engine, predict_detections
from finetune.evaluation.metrics import coco_map

IOU = 0.9


def agrees(reference: Sequence[Box], other: Sequence[Box], threshold: float = IOU) -> bool:
    """Same label multiset, and a one-to-one same-label matching with IoU >= ``threshold``."""
    if Counter(b.label for b in reference) != Counter(b.label for b in other):
        return False
    unmatched = list(reference)
    for box in other:
        match = next((r for r in unmatched if r.label == box.label and box_iou(r.box, box.box) >= threshold), None)
        if match is None:
            return False
        unmatched.remove(match)
    return True


async def _predict(model: str, kind: str, data: DetectionSet) -> dict[int, list[Box]]:
    async with open_engine(model, kind, max_batch_size=16) as engine:
        return await predict_detections(engine, data, max_new_tokens=64, concurrency=16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="trained checkpoint directory")
    parser.add_argument("--data", required=True, help="held-out COCO annotations.json")
    parser.add_argument("--limit", type=int, default=0, help="first N images only (0: all)")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    data = load_coco(args.data)
    if args.limit:
        data = DetectionSet(images=data.images[: args.limit], classes=data.classes)
    faithful = asyncio.run(_predict(args.model, "transformers", data))
    vllm = asyncio.run(_predict(args.model, "vllm", data))
    same = sum(agrees(faithful[i.image_id], vllm[i.image_id]) for i in data.images)
    map_hf, map_vllm = coco_map(data, faithful)["map_50"], coco_map(data, vllm)["map_50"]
    lines = [
        f"{len(data.images)} held-out images; agreement = same labels and one-to-one IoU >= {IOU}",
        f"vLLM-CPU agrees with transformers on {same}/{len(data.images)} images ({same / len(data.images):.1%})",
        f"mAP@0.5: transformers {map_hf:.3f}, vLLM-CPU {map_vllm:.3f}",
    ]
    print("\n".join(lines))  # noqa: T201 - a benchmark prints its result


if __name__ == "__main__":
    main()
