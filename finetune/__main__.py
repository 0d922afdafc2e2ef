"""``python -m finetune <command>``: the command-line face of the finetune package.

Commands: ``tiny`` (a tiny random PaliGemma), ``random-like`` (random weights, a released architecture),
``synth`` (synthetic shapes data), ``mask-codebook`` (a mask VQ-VAE trained on the shapes), ``train``,
``merge``, ``eval``, ``demo`` (the CPU quality benchmark), ``lora-demo`` (a new class taught with LoRA) and
``segment-demo`` (the demo model finetuned to segment).
Each command's flags are generated from its dataclass config in :mod:`finetune.config` (or a recipe's, e.g.
:class:`finetune.recipes.demo_config.DemoConfig`) by :mod:`finetune.options`, so ``--help`` shows the same
documentation as the Python API.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from finetune.config import EvalConfig, MergeConfig, TrainConfig
from finetune.options import add_arguments
from finetune.options import from_args as _from_args

log = logging.getLogger("finetune")
C = TypeVar("C")


def from_args(cls: type[C], args: argparse.Namespace) -> C:
    """The config from the flags; its validation errors (which name the flag) end the program cleanly."""
    try:
        return _from_args(cls, args)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None


def _tiny(args: argparse.Namespace) -> None:
    from paligemma.checkpoint import TinyConfig, build_tiny_checkpoint

    cfg = TinyConfig(image_size=args.image_size, init_std=args.init_std)
    out = build_tiny_checkpoint(args.out, seed=args.seed, cfg=cfg)
    log.info("wrote a tiny random PaliGemma to %s", out)


def _random_like(args: argparse.Namespace) -> None:
    from paligemma.random_like import build_random_like

    if (args.layers is not None and args.layers < 1) or (args.vision_layers is not None and args.vision_layers < 1):
        raise SystemExit("error: --layers and --vision-layers must be at least 1")
    out = build_random_like(
        args.arch,
        args.out,
        layers=args.layers,
        vision_layers=args.vision_layers,
        dtype=args.dtype,
        seed=args.seed,
        max_shard_bytes=int(args.max_shard_gib * 2**30),
    )
    log.info("wrote a random-weight %s to %s", args.arch, out)


def _add_random_like(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from paligemma.variants import ARCHITECTURES, describe

    listing = "\n".join(f"  {describe(v)}" for v in ARCHITECTURES.values())
    parser = commands.add_parser(
        "random-like",
        help="write a random-weight checkpoint with a released PaliGemma 1/2 architecture (no download)",
        description="Random weights, the released architecture, the real vocabulary and special-token ids, "
        "the hub layout; written one tensor at a time (memory: the largest tensor plus one shard).",
        epilog=f"architectures (parameters at full depth):\n{listing}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("arch", choices=list(ARCHITECTURES), metavar="ARCH", help="architecture, listed below")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--layers", type=int, default=None, help="text decoder blocks (default: the real count)")
    parser.add_argument("--vision-layers", type=int, default=None, help="SigLIP blocks (default: the real 27)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-shard-gib", type=float, default=2.0, help="shard the safetensors above this size")
    parser.set_defaults(func=_random_like)


def _synth(args: argparse.Namespace) -> None:
    from finetune.data.synth import generate

    out = generate(
        args.out,
        args.n,
        seed=args.seed,
        size=args.size,
        shapes=tuple(args.shapes.split(",")),
        max_shapes=args.max_shapes,
        masks=args.masks,
    )
    log.info("wrote %d synthetic images to %s (annotations.json, vqa.jsonl, images/)", args.n, out)


def _train(args: argparse.Namespace) -> None:
    from finetune.data.records import DataError, data_error_message
    from finetune.options import FlagError
    from finetune.training.train import first_process, train

    try:
        trained = train(from_args(TrainConfig, args))
        if first_process():  # one summary, from the process that wrote the files
            log.info("trained: %s", trained)
    except FlagError as exc:
        raise SystemExit(f"error: {exc}") from None
    except DataError as exc:  # also from a DataLoader worker: one clean line, never the worker's traceback
        raise SystemExit(f"error: {data_error_message(exc)}") from None


def _merge(args: argparse.Namespace) -> None:
    from finetune.training.merge import merge

    log.info("merged checkpoint: %s", merge(from_args(MergeConfig, args)))


def _eval(args: argparse.Namespace) -> None:
    cfg = from_args(EvalConfig, args)
    report = asyncio.run(run_eval(cfg))
    if cfg.compare:
        sys.stdout.write(Path(cfg.out, "report.md").read_text())  # both models' metrics, per-image IoU change
        return
    log.info("report: %s", json.dumps({k: v for k, v in report.items() if k != "pictures"}))


async def run_eval(cfg: EvalConfig) -> dict[str, object]:
    """Load the held-out data, open the chosen engine on ``cfg.model`` and evaluate (``eval`` command).

    With ``cfg.compare``, the base model and ``cfg.model`` are evaluated in turn (:mod:`finetune.evaluation.compare`).
    """
    from finetune.data.loaders import load_coco, load_vqa
    from finetune.data.segments import load_coco_segments
    from finetune.evaluation.evaluate import evaluate, open_engine

    loader = load_coco_segments if cfg.segmentation_weights else load_coco  # segmentation: objects keep masks
    detection = loader(cfg.coco, cfg.coco_images) if cfg.coco else None
    vqa = load_vqa(cfg.vqa) if cfg.vqa else None
    if detection is not None and cfg.classes:
        detection = detection.only(cfg.classes)  # mAP averages over the asked classes only
    if cfg.limit is not None:
        if detection is not None:
            detection.images = detection.images[: cfg.limit]
        vqa = vqa[: cfg.limit] if vqa else vqa
    if cfg.compare:
        from finetune.evaluation.compare import compare

        engines = {
            "base": open_engine(
                cfg.compare, cfg.engine, device=cfg.device, keep_sliding_window=cfg.keep_sliding_window
            ),
            "finetuned": open_engine(
                cfg.model, cfg.engine, device=cfg.device, keep_sliding_window=cfg.keep_sliding_window
            ),
        }
        return await compare(
            engines,
            detection=detection,
            vqa=vqa,
            out=cfg.out,
            pictures=cfg.pictures,
            sheet=cfg.sheet,
            classes=cfg.classes or None,
            classes_per_prompt=cfg.classes_per_prompt,
            segment_classes_per_prompt=cfg.segment_classes_per_prompt,
            max_new_tokens=cfg.max_new_tokens,
            concurrency=cfg.concurrency,
            segmentation_weights=cfg.segmentation_weights,
        )
    engine_cm = open_engine(cfg.model, cfg.engine, device=cfg.device, keep_sliding_window=cfg.keep_sliding_window)
    async with engine_cm as engine:
        return await evaluate(
            engine,
            detection=detection,
            vqa=vqa,
            out=cfg.out,
            classes=cfg.classes or None,
            classes_per_prompt=cfg.classes_per_prompt,
            segment_classes_per_prompt=cfg.segment_classes_per_prompt,
            pictures=cfg.pictures,
            max_new_tokens=cfg.max_new_tokens,
            concurrency=cfg.concurrency,
            segmentation_weights=cfg.segmentation_weights,
        )


def _demo(args: argparse.Namespace) -> None:
    from finetune.recipes.demo import run_demo
    from finetune.recipes.demo_config import DemoConfig

    report = run_demo(from_args(DemoConfig, args))
    if report:
        log.info("held-out: %s", json.dumps(report.get("heldout", {}).get("detection", {})))


def _lora_demo(args: argparse.Namespace) -> None:
    from finetune.evaluation.served import table_markdown
    from finetune.recipes.transfer import TransferConfig, run_transfer

    report = run_transfer(from_args(TransferConfig, args))
    sys.stdout.write(table_markdown(report["forms"], report["heldout"]["prompts"]))


def _segment_demo(args: argparse.Namespace) -> None:
    from finetune.recipes.segment_demo import SegmentDemoConfig, run_segment_demo, scores_markdown

    report = run_segment_demo(from_args(SegmentDemoConfig, args))
    sys.stdout.write(scores_markdown(report["heldout"]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m finetune", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    tiny = commands.add_parser("tiny", help="write a tiny random PaliGemma that transformers and vLLM load")
    tiny.add_argument("--out", type=Path, required=True, help="output directory")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--image-size", type=int, default=112, help="square input side in pixels (patch 14)")
    tiny.add_argument("--init-std", type=float, default=None, help="std of random weights (default 0.02)")
    tiny.set_defaults(func=_tiny)
    _add_random_like(commands)

    synth = commands.add_parser("synth", help="synthetic shapes: COCO annotations.json + vqa.jsonl + images/")
    synth.add_argument("--out", type=Path, required=True, help="output directory")
    synth.add_argument("--n", type=int, required=True, help="number of images")
    synth.add_argument("--seed", type=int, default=0, help="dataset seed (use another one for held-out data)")
    synth.add_argument("--size", type=int, default=112, help="square image side in pixels")
    synth.add_argument(
        "--shapes", default="circle,square,triangle", help="comma-separated, from circle,square,triangle,diamond"
    )
    synth.add_argument("--max-shapes", type=int, default=4, help="shapes per image are drawn from 1..N (1-4)")
    synth.add_argument("--masks", action="store_true", help="each annotation's segmentation too (compressed RLE)")
    synth.set_defaults(func=_synth)

    from finetune.recipes.mask_codebook import add_command

    add_command(commands)

    train = commands.add_parser("train", help="LoRA / QLoRA / full finetuning with the transformers Trainer")
    add_arguments(train, TrainConfig)
    train.set_defaults(func=_train)

    merge = commands.add_parser("merge", help="adapter -> merged hub-layout checkpoint (idempotent)")
    add_arguments(merge, MergeConfig)
    merge.set_defaults(func=_merge)

    evaluate = commands.add_parser(
        "eval", help="mAP / VQA accuracy through a service engine, report + pictures; --compare BASE: before/after"
    )
    add_arguments(evaluate, EvalConfig)
    evaluate.set_defaults(func=_eval)

    from finetune.recipes.demo_config import DemoConfig

    demo = commands.add_parser("demo", help="the CPU quality benchmark: build, train, evaluate the demo model")
    add_arguments(demo, DemoConfig)
    demo.set_defaults(func=_demo)

    from finetune.recipes.transfer import TransferConfig

    lora_demo = commands.add_parser(
        "lora-demo", help="teach the demo model a new shape with LoRA, merge, and score every served form"
    )
    add_arguments(lora_demo, TransferConfig)
    lora_demo.set_defaults(func=_lora_demo)

    from finetune.recipes.segment_demo import SegmentDemoConfig

    segment_demo = commands.add_parser(
        "segment-demo", help="finetune the demo model to segment and score it on both engines"
    )
    add_arguments(segment_demo, SegmentDemoConfig)
    segment_demo.set_defaults(func=_segment_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun / accelerate launch
    rank = f" rank {os.environ.get('RANK', '0')}/{world}" if world > 1 else ""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s{rank} %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
