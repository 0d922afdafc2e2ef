"""What the detection grammar changes and costs: both engines, with and without it, in one run.

    .venv/bin/python -m finetune synth --out artifacts/heldout --n 200 --seed 2   # the demo's held-out set
    .venv/bin/python benchmarks/detection_grammar.py --model models/demo --data artifacts/heldout/annotations.json

For each engine (transformers, then vLLM with the prefix-LM plugin) and each mode (free, constrained),
every held-out image is asked ``detect`` for all classes, 16 requests in flight, as
``finetune.evaluation.evaluate`` does. Printed per row: mAP@0.5 against the ground truth, objects dropped (runs of
loc tokens that did not become a detection with an asked label), mean answer length in tokens, and
generated tokens/s. Not a test: speed depends on the machine; compare rows of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from finetune.data.loaders import load_coco
from finetune.evaluation.evaluate import answers_to_boxes, detection_answers, open_engine
from finetune.evaluation.metrics import coco_map
from paligemma.parsing import objects_started
from paligemma.tokens import SpecialIds


def _dropped(answers: list[Any], boxes: dict[int, list[Any]], special: SpecialIds) -> int:
    """Objects started (runs of loc tokens) minus detections kept."""
    started = sum(objects_started(generation.token_ids, special) for _, _, generation in answers)
    return started - sum(len(b) for b in boxes.values())


async def _rows(model: str, kind: str, data: Any, max_new_tokens: int) -> list[str]:
    rows = []
    async with open_engine(model, kind, max_batch_size=16) as engine:
        await detection_answers(engine, data, max_new_tokens=max_new_tokens, concurrency=16)  # warm-up
        for constrained in (False, True):
            start = time.perf_counter()
            answers = await detection_answers(
                engine, data, max_new_tokens=max_new_tokens, concurrency=16, constrained=constrained
            )
            elapsed = time.perf_counter() - start
            tokens = sum(len(g.token_ids) for _, _, g in answers)
            boxes = answers_to_boxes(answers, data, engine.tokenizer())
            dropped = _dropped(answers, boxes, SpecialIds.from_tokenizer(engine.tokenizer()))
            mode = "constrained" if constrained else "free"
            rows.append(
                f"{kind} | {mode} | {coco_map(data, boxes)['map_50']:.3f} | {dropped} | "
                f"{tokens / len(answers):.1f} | {tokens / elapsed:.0f}"
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="trained checkpoint directory")
    parser.add_argument("--data", required=True, help="held-out COCO annotations.json")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    data = load_coco(args.data)
    rows = [f"{len(data.images)} images, up to {args.max_new_tokens} new tokens, 16 in flight"]
    rows.append("engine | decoding | mAP@0.5 | objects dropped | tokens per answer | tokens/s")
    for kind in ("transformers", "vllm"):
        rows += asyncio.run(_rows(args.model, kind, data, args.max_new_tokens))
    print("\n".join(rows))  # noqa: T201 - a benchmark prints its table


if __name__ == "__main__":
    main()
