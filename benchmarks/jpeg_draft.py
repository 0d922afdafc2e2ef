"""What ``jpeg_draft`` costs in accuracy and saves in decode time, on the demo model (not a test).

``jpeg_draft`` lets the JPEG decoder scale by 1/2, 1/4 or 1/8 while decoding (DCT scaling), as long as the
result still covers the model's input: far less work for a phone photo, but other pixels than the exact
path. This measures both sides on photo-sized JPEGs whose ground truth is known: the demo model's held-out
images (``python -m finetune demo``'s seed) scaled up to ``--side`` pixels and saved as JPEG, so the model
sees its own kind of image, through :func:`service.model_input.prepare` exactly as the service runs it.

    .venv/bin/python benchmarks/jpeg_draft.py                 # 200 images at 3024 x 3024, ~5 min on 2 cores
    .venv/bin/python benchmarks/jpeg_draft.py --images 50 --side 1080

Printed per setting: decode+resize ms per image (median, in this process), mAP@0.5 and mAP@[.5:.95]
(pycocotools), and how many answers are token for token the exact path's.
"""

# ruff: noqa: T201  (a command-line benchmark: the table goes to stdout)
from __future__ import annotations

import argparse
import asyncio
import io
import statistics
from pathlib import Path
from typing import Any

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
OBJECTS = ["circle", "square", "triangle"]


def photos(count: int, side: int) -> tuple[list[bytes], Any]:
    """JPEG bytes of the first ``count`` held-out demo images at ``side`` px, and their detection set."""
    from finetune.data.records import Box, DetectionImage, DetectionSet
    from finetune.data.synth import render
    from finetune.recipes.demo_config import DemoConfig

    datas, images = [], []
    for index in range(count):
        image, shapes = render(DemoConfig().heldout_seed, index)
        scale = side / image.width
        buffer = io.BytesIO()
        image.resize((side, side), Image.Resampling.BICUBIC).save(buffer, format="JPEG", quality=90)
        datas.append(buffer.getvalue())
        objects = [Box(s.kind, tuple(v * scale for v in s.box)) for s in shapes]  # type: ignore[arg-type]
        images.append(DetectionImage(index, Path(f"{index}.jpg"), side, side, objects))
    return datas, DetectionSet(images, OBJECTS)


async def score(datas: list[bytes], dataset: Any, draft: bool) -> tuple[float, dict[str, Any], list[Any]]:
    import time

    from finetune.evaluation.evaluate import answers_to_boxes, open_engine
    from finetune.evaluation.metrics import coco_map
    from paligemma import prompts
    from service.engines.protocol import GenerationRequest
    from service.images import ImageLimits
    from service.model_input import load_resize, prepare

    limits = ImageLimits(max_bytes=50 * 2**20, max_pixels=89_000_000, max_aspect_ratio=20.0)
    resize = load_resize(ROOT / "models" / "demo")
    seconds, inputs = [], []
    for data in datas:
        start = time.perf_counter()
        inputs.append(prepare(data, limits, resize, draft=draft).image)
        seconds.append(time.perf_counter() - start)
    async with open_engine(ROOT / "models" / "demo") as engine:
        requests = [GenerationRequest(image, prompts.detect(OBJECTS), 64) for image in inputs]
        generations = await asyncio.gather(*(engine.generate(r) for r in requests))
        answers = [(image, OBJECTS, g) for image, g in zip(dataset.images, generations, strict=True)]
        result = coco_map(dataset, answers_to_boxes(answers, dataset, engine.tokenizer()))
    return statistics.median(seconds) * 1000, result, [g.token_ids for g in generations]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--side", type=int, default=3024, help="Pixels per side of the JPEGs")
    args = parser.parse_args()
    datas, dataset = photos(args.images, args.side)
    megabytes = sum(len(d) for d in datas) / len(datas) / 2**20
    print(f"{args.images} held-out demo images as {args.side}x{args.side} JPEG (q90, {megabytes:.1f} MB each)")
    print(f"{'jpeg_draft':>10} {'decode ms':>9} {'mAP@0.5':>8} {'mAP':>6} {'answers = exact':>16}")
    exact_ids: list[Any] = []
    for draft in (False, True):
        ms, result, ids = asyncio.run(score(datas, dataset, draft))
        exact_ids = exact_ids or ids
        same = sum(a == b for a, b in zip(ids, exact_ids, strict=True))
        print(f"{str(draft):>10} {ms:9.1f} {result['map_50']:8.3f} {result['map']:6.3f} {same:>10}/{len(ids)}")


if __name__ == "__main__":
    main()
