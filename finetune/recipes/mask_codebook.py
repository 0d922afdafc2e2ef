"""A mask codebook for the shapes demo: big_vision's VQ-VAE, trained here on synthetic shape masks.

Google's ``vae-oid.npz`` cannot be downloaded in this project's sandbox, and a real PaliGemma needs that very
file (``gs://big_vision/paligemma/vae-oid.npz``, see :mod:`paligemma.segmentation`): its 128 codewords are
what the model's ``<segNNN>`` tokens mean. The demo model is trained here from scratch, so it can use any
codebook, provided the file is a drop-in: the encoder and decoder trained below are the modules that
:class:`~paligemma.mask_encoder.MaskEncoder` and :class:`~paligemma.segmentation.MaskDecoder` build
(``build_module`` of each), so the file has the real one's keys, layout and dtype; only D is smaller.

Masks reach the encoder as big_vision presents them: a shape drawn in a 224x224 image, cropped to its
pixel box and resized to 64x64 by :func:`~paligemma.mask_encoder.crop_resize`. Sizes, aspect ratios,
rotations, truncation at the image edge and bites taken by an occluding shape vary, so the code is more
than "which of four kinds".

The codebook is learned with EMA updates (van den Oord et al. 2017, appendix; sonnet's
``VectorQuantizerEMA``) plus the commitment loss and a straight-through gradient to the encoder: the real
file carries ``_vq_vae._ema_w`` / ``_ema_cluster_size``, so big_vision's VAE was trained this way, and EMA
codewords do not depend on the learning rate. Rarely used codewords restart at the encoder outputs the
codebook serves worst (until 80% of the steps), or a short run would use only a few of the 128 entries.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from finetune.data.synth import SHAPES, Shape, _draw
from paligemma import mask_encoder, segmentation
from paligemma.mask_encoder import MaskEncoder, crop_resize
from paligemma.segmentation import GRID, MaskDecoder, encoder_weight_shapes, paste_mask
from paligemma.tokens import NUM_SEG_TOKENS

IMAGE = 224  # PaliGemma's smallest input side; objects are 8-200 px in it
WEIGHTS_NAME = "vae-shapes.npz"
CARD_NAME = "card.json"
Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class CodebookConfig:
    """How the codebook is trained (every field is written to the card)."""

    steps: int = 1000
    seed: int = 0
    batch_size: int = 32
    embedding_dim: int = 32
    """D: the file's only free size. 32 keeps the codebook small; the convs keep big_vision's widths."""
    lr: float = 2e-3
    commitment: float = 0.25
    decay: float = 0.99
    heldout_per_kind: int = 50


def sample(rng: random.Random, kind: str) -> tuple[np.ndarray, Box]:
    """One object: a ``[224, 224]`` bool mask of a ``kind`` shape and its tight pixel box ``(x1, y1, x2, y2)``."""
    side, aspect = math.exp(rng.uniform(math.log(8), math.log(200))), math.exp(rng.uniform(-1.1, 1.1))
    w, h = max(4, round(side * math.sqrt(aspect))), max(4, round(side / math.sqrt(aspect)))
    image = _drawn(kind, (0, 0, w, h), (w, h))
    if rng.random() < 0.5:
        image = image.rotate(rng.uniform(0, 360), resample=Image.Resampling.NEAREST, expand=True)
    shape = np.asarray(image) > 0
    mask = _paste(shape, rng, truncate=rng.random() < 0.2)
    if rng.random() < 0.3:  # a bite taken by another shape in front
        ys, xs = np.nonzero(mask)
        cx, cy, size = int(rng.choice(xs)), int(rng.choice(ys)), max(3, round(rng.uniform(0.2, 0.6) * max(w, h)))
        box = (cx - size // 2, cy - size // 2, cx - size // 2 + size, cy - size // 2 + size)
        cover = _drawn(rng.choice(SHAPES), box, (IMAGE, IMAGE))
        bitten = mask & (np.asarray(cover) == 0)
        if bitten.sum() >= max(12, 0.25 * mask.sum()):
            mask = bitten
    ys, xs = np.nonzero(mask)
    return mask, (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


def _drawn(kind: str, box: Box, size: tuple[int, int]) -> Image.Image:
    """A one-channel image of ``kind`` filling ``box``, drawn by the demo's own :func:`finetune.data.synth._draw`."""
    image = Image.new("RGB", size)
    _draw(ImageDraw.Draw(image), Shape(kind, "white", box))
    return image.getchannel(0)


def _paste(shape: np.ndarray, rng: random.Random, truncate: bool) -> np.ndarray:
    """``shape`` at a random place of an empty image; with ``truncate`` up to 40% of it past an edge."""
    mask = np.zeros((IMAGE, IMAGE), bool)
    offsets = []
    for extent in shape.shape:
        lo, hi = min(0, IMAGE - extent), max(0, IMAGE - extent)
        if truncate:
            lo, hi = lo - int(0.4 * extent), hi + int(0.4 * extent)
        offsets.append(rng.randint(lo, hi))
    (oy, ox), (sh, sw) = offsets, shape.shape
    y0, x0, y1, x1 = max(oy, 0), max(ox, 0), min(oy + sh, IMAGE), min(ox + sw, IMAGE)
    mask[y0:y1, x0:x1] = shape[y0 - oy : y1 - oy, x0 - ox : x1 - ox]
    return mask if mask.any() else _paste(shape, rng, truncate=False)


def batch(seed: int, step: int, size: int) -> torch.Tensor:
    """Training batch ``step``: ``[size, 1, 64, 64]`` crops in [0, 1], a function of ``(seed, step)`` only."""
    rng = random.Random(f"train:{seed}:{step}")
    crops = [crop_resize(*sample(rng, rng.choice(SHAPES))) for _ in range(size)]
    return torch.from_numpy(np.stack(crops))[:, None]


def heldout(seed: int, per_kind: int) -> dict[str, list[tuple[np.ndarray, Box]]]:
    """Held-out objects per kind, from a seed stream that training never draws from."""
    return {
        kind: [sample(random.Random(f"heldout:{seed}:{kind}:{i}"), kind) for i in range(per_kind)] for kind in SHAPES
    }


def _distances(flat: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """``[M, K]`` squared distances: the expanded form ``MaskEncoder`` uses, so the argmin is the same."""
    return (flat**2).sum(1, keepdim=True) + (codebook**2).sum(1) - 2 * flat @ codebook.T


def train(cfg: CodebookConfig, progress: bool = True) -> tuple[dict[str, np.ndarray], float]:
    """Train for ``cfg.steps`` and return the file's arrays (float32) and the mean loss of the last 50 steps.

    Deterministic on CPU: torch, numpy and random are seeded, each batch depends on ``(seed, step)`` only,
    codewords start from a seeded draw, and torch runs on one thread, which also makes the sums
    independent of the core count and is faster on a busy 2-core machine (0.5 s a step against 2-3 s with two
    threads, measured while other jobs ran).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(cfg, progress)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: CodebookConfig, progress: bool) -> tuple[dict[str, np.ndarray], float]:
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    init_rng = torch.Generator().manual_seed(cfg.seed)
    dim, codes = cfg.embedding_dim, NUM_SEG_TOKENS
    encoder = mask_encoder.build_module(encoder_weight_shapes(dim))
    decoder = segmentation.build_module(dim, codes)
    codebook, upsample = decoder.get_parameter("_vq_vae._embedding"), decoder.get_submodule("decoder")
    codebook.requires_grad_(False)  # moved by the EMA, not by the optimiser
    params = [p for p in [*encoder.parameters(), *decoder.parameters()] if p.requires_grad]
    optimiser = torch.optim.Adam(params, lr=cfg.lr)
    warmup = min(50, cfg.steps // 10 + 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / max(cfg.steps, 1)))
    )
    ema_w, ema_size, losses = torch.zeros(codes, dim), torch.zeros(codes), []
    bar = tqdm(range(cfg.steps), desc="mask codebook", disable=not progress)
    for step in bar:
        masks = batch(cfg.seed, step, cfg.batch_size)
        z = encoder(2.0 * (masks - 0.5))
        flat = z.permute(0, 2, 3, 1).reshape(-1, dim)
        if step == 0:  # codewords start on encoder outputs, so none starts far from the data
            ema_w.copy_(flat[torch.randint(len(flat), (codes,), generator=init_rng)].detach())
            ema_size.fill_(1.0)
            codebook.copy_(ema_w)
        distances = _distances(flat.detach(), codebook)
        nearest = distances.argmin(1)
        onehot = torch.nn.functional.one_hot(nearest, codes).float()
        quantized = (onehot @ codebook).reshape(z.shape[0], GRID, GRID, dim).permute(0, 3, 1, 2)
        logits = upsample(z + (quantized - z).detach())[:, 0]  # straight-through to the encoder
        recon = torch.nn.functional.binary_cross_entropy_with_logits(logits, masks[:, 0])
        loss = recon + cfg.commitment * torch.nn.functional.mse_loss(z, quantized)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        schedule.step()
        with torch.no_grad():
            ema_size.mul_(cfg.decay).add_(onehot.sum(0), alpha=1 - cfg.decay)
            ema_w.mul_(cfg.decay).add_(onehot.T @ flat, alpha=1 - cfg.decay)
            dead = (ema_size < 0.125 * len(flat) / codes).nonzero()[:, 0][: len(flat)]
            if step % 10 == 9 and step < 0.8 * cfg.steps and len(dead):
                # Restart rarely used codewords at the encoder outputs the codebook serves worst; not near the
                # end, so the decoder has learned every codeword the file keeps.
                error = distances.gather(1, nearest[:, None])[:, 0]
                ema_w[dead] = flat[error.argsort(descending=True, stable=True)[: len(dead)]]
                ema_size[dead] = 1.0
            total = ema_size.sum()
            smoothed = (ema_size + 1e-5) / (total + codes * 1e-5) * total  # Laplace: no division by zero
            codebook.copy_(ema_w / smoothed[:, None])
        losses.append(loss.item())
        if step % 10 == 9:
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.4f}", codes=int((ema_size > 0.5).sum()))
    state = {
        **encoder.state_dict(),
        **decoder.state_dict(),
        "_vq_vae._ema_w": ema_w,
        "_vq_vae._ema_cluster_size": ema_size,
    }
    arrays = {key: value.detach().numpy().astype(np.float32) for key, value in state.items()}
    return arrays, float(np.mean(losses[-50:])) if losses else float("nan")


def save(arrays: dict[str, np.ndarray], path: Path) -> Path:
    """Write the arrays as ``vae-oid.npz`` is written (plain ``np.savez``, float32)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:  # a file object keeps np.savez from appending ".npz"
        np.savez(f, **arrays)  # type: ignore[arg-type]
    return path


def round_trip_iou(path: Path, seed: int, per_kind: int) -> dict[str, dict[str, float]]:
    """Per kind, the mean IoU of encode -> 16 ids -> ``MaskDecoder`` -> logits > 0 on held-out masks.

    ``crop``: against the 64x64 crop (> 0.5), the level the codebook works at; ``box``: the decoded logits
    pasted into the pixel box by :func:`~paligemma.segmentation.paste_mask`, as ``/segment`` does, against
    the object's mask in the whole image; ``codes``: how many distinct codewords the kind's masks use.
    """
    encoder, decoder = MaskEncoder.from_npz(path), MaskDecoder.from_npz(path)
    report: dict[str, dict[str, float]] = {}
    for kind, objects in heldout(seed, per_kind).items():
        crops = np.stack([crop_resize(mask, box) for mask, box in objects])
        ids = encoder.encode(crops)
        logits = decoder.decode(ids)
        crop_iou = [_iou(crop > 0.5, out > 0) for crop, out in zip(crops, logits, strict=True)]
        box_iou = [
            _iou(mask, paste_mask(out, box, IMAGE, IMAGE)) for (mask, box), out in zip(objects, logits, strict=True)
        ]
        report[kind] = {"crop": float(np.mean(crop_iou)), "box": float(np.mean(box_iou)), "codes": len(np.unique(ids))}
    return report


def _iou(a: np.ndarray, b: np.ndarray | None) -> float:
    b = np.zeros_like(a) if b is None else b
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def run(out: Path, cfg: CodebookConfig, progress: bool = True) -> Path:
    """Train, write ``OUT/vae-shapes.npz`` and ``OUT/card.json`` (config, loss, time, held-out IoU); the npz."""
    start = time.perf_counter()
    arrays, loss = train(cfg, progress=progress)
    seconds = time.perf_counter() - start
    path = save(arrays, Path(out) / WEIGHTS_NAME)
    iou = round_trip_iou(path, cfg.seed, cfg.heldout_per_kind)
    card: dict[str, Any] = {
        "what": "big_vision VQ-VAE layout (drop-in for vae-oid.npz) trained on synthetic shape masks; "
        f"not Google's file: real PaliGemma models need {segmentation.WEIGHTS_URL}",
        "config": asdict(cfg),
        "loss_last_50": loss,
        "train_seconds": round(seconds, 1),
        "torch": torch.__version__,
        "file_bytes": path.stat().st_size,
        "heldout": {"seed": cfg.seed, "per_kind": cfg.heldout_per_kind, "image": IMAGE},
        "iou": iou,
        "mean_iou": {level: float(np.mean([v[level] for v in iou.values()])) for level in ("crop", "box")},
    }
    (Path(out) / CARD_NAME).write_text(json.dumps(card, indent=2) + "\n")
    return path


def add_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``python -m finetune mask-codebook --out DIR [--steps N]``."""
    parser = commands.add_parser(
        "mask-codebook", help="train a vae-oid.npz-layout mask codebook (VQ-VAE) on synthetic shape masks"
    )
    parser.add_argument("--out", type=Path, required=True, help=f"output directory ({WEIGHTS_NAME}, {CARD_NAME})")
    defaults = CodebookConfig()
    for name in ("steps", "seed", "batch_size", "embedding_dim"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> None:
    cfg = CodebookConfig(steps=args.steps, seed=args.seed, batch_size=args.batch_size, embedding_dim=args.embedding_dim)
    path = run(args.out, cfg)
    card = json.loads((path.parent / CARD_NAME).read_text())
    logging.getLogger("finetune").info("wrote %s; held-out mean IoU %s", path, card["mean_iou"])
