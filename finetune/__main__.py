"""``python -m finetune <command>``: the command-line face of the finetune package."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path


def _tiny(args: argparse.Namespace) -> None:
    from paligemma.checkpoint import TinyConfig, build_tiny_checkpoint

    cfg = TinyConfig(image_size=args.image_size, init_std=args.init_std)
    out = build_tiny_checkpoint(args.out, seed=args.seed, cfg=cfg)
    logging.info("wrote a tiny random PaliGemma to %s", out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m finetune", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    tiny = commands.add_parser("tiny", help="write a tiny random PaliGemma that transformers and vLLM load")
    tiny.add_argument("--out", type=Path, required=True, help="output directory")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--image-size", type=int, default=112, help="square input side in pixels (patch 14)")
    tiny.add_argument("--init-std", type=float, default=None, help="std of random weights (default 0.02)")
    tiny.set_defaults(func=_tiny)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
