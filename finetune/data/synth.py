"""Synthetic shapes: a detection + VQA dataset that a tiny model can learn on a CPU in minutes.

Each image has 1-4 non-overlapping, brightly coloured shapes of varied size and position on a dark, muted,
varied background (a two-colour gradient with a little noise). Dark backgrounds keep the shapes salient:
a tiny model trained from scratch on a 2-core CPU must learn them within minutes. Output layout::

    OUT/images/000000.png ...
    OUT/annotations.json     COCO detection: images (file_name "images/000000.png"), annotations
                             (bbox [x, y, w, h] in pixels, plus the shape's "color"), categories
    OUT/vqa.jsonl            {"image", "question", "answer", "type"} lines about count, colour, position, shape

Paths inside are relative to OUT, which is the default image folder of every loader in ``finetune.data``.
Image ``i`` depends only on ``(seed, i)``, so a dataset is reproducible and a larger ``n`` extends a smaller
one; use a different seed for a held-out set.

:func:`generate_photos` writes photo-sized JPEGs (1920x1080, quality 90, a textured background so each file
is about 630 KB like a real photo) with COCO annotations only: for memory and speed checks of the training
input path, where 112-px PNGs would hide what a real dataset costs.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond")
DEFAULT_SHAPES = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (40, 190, 60),
    "blue": (45, 95, 245),
    "yellow": (245, 225, 40),
    "purple": (165, 60, 215),
    "white": (245, 245, 245),
}
NUMBERS = ("zero", "one", "two", "three", "four", "five")


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    box: tuple[int, int, int, int]
    """Pixel box ``(x1, y1, x2, y2)``, x2/y2 exclusive, so the COCO bbox is ``(x1, y1, x2-x1, y2-y1)``."""


def _background(rng: random.Random, width: int, height: int) -> Image.Image:
    """Muted two-colour gradient (vertical or horizontal) with light noise: never one of the shape colours."""

    def muted() -> tuple[int, int, int]:
        grey = rng.randint(12, 80)
        return tuple(min(255, max(0, grey + rng.randint(-12, 12))) for _ in range(3))  # type: ignore[return-value]

    a, b = np.array(muted(), dtype=np.float32), np.array(muted(), dtype=np.float32)
    vertical = rng.random() < 0.5
    steps = np.linspace(0.0, 1.0, height if vertical else width, dtype=np.float32)
    ramp = a + (b - a) * steps[:, None]  # (steps, 3)
    pixels = np.broadcast_to(ramp[:, None, :] if vertical else ramp[None, :, :], (height, width, 3))
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0.0, rng.uniform(1.0, 4.0), (height, width, 1))
    return Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))  # seeded noise: reproducible


def _place(rng: random.Random, width: int, height: int, count: int) -> list[tuple[int, int, int, int]]:
    """Up to ``count`` square boxes, side 12-45% of the short side, 2 px apart, fully inside the image."""
    short = min(width, height)
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(200):
        if len(boxes) == count:
            break
        side = rng.randint(max(8, round(0.12 * short)), round(0.45 * short))
        x, y = rng.randint(0, width - side), rng.randint(0, height - side)
        box = (x, y, x + side, y + side)
        if all(box[0] >= b[2] + 2 or b[0] >= box[2] + 2 or box[1] >= b[3] + 2 or b[1] >= box[3] + 2 for b in boxes):
            boxes.append(box)
    return boxes


def _draw(draw: ImageDraw.ImageDraw, shape: Shape, fill: int | tuple[int, int, int] | None = None) -> None:
    """Paint ``shape`` in its colour, or in ``fill`` (a mask's 1)."""
    x1, y1, x2, y2 = shape.box
    fill = COLORS[shape.color] if fill is None else fill
    r, b = x2 - 1, y2 - 1  # PIL coordinates are inclusive
    cx, cy = (x1 + r) / 2, (y1 + b) / 2
    if shape.kind == "circle":
        draw.ellipse((x1, y1, r, b), fill=fill)
    elif shape.kind == "square":
        draw.rectangle((x1, y1, r, b), fill=fill)
    elif shape.kind == "triangle":
        draw.polygon([(x1, b), (r, b), (cx, y1)], fill=fill)
    elif shape.kind == "diamond":
        draw.polygon([(cx, y1), (r, cy), (cx, b), (x1, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape.kind!r}; known: {', '.join(SHAPES)}")


def mask_rle(shape: Shape, size: int) -> dict[str, Any]:
    """The shape's pixels in a ``size`` x ``size`` image (exactly those :func:`render` paints, shapes never
    overlap) as COCO compressed RLE, ``counts`` a str as in COCO files."""
    from pycocotools import mask as mask_utils

    canvas = Image.new("L", (size, size), 0)
    _draw(ImageDraw.Draw(canvas), shape, fill=1)
    rle = mask_utils.encode(np.asfortranarray(np.asarray(canvas) > 0, dtype=np.uint8))
    return {"size": [size, size], "counts": rle["counts"].decode()}


def render(
    seed: int, index: int, size: int = 112, shapes: tuple[str, ...] = DEFAULT_SHAPES, max_shapes: int = 4
) -> tuple[Image.Image, list[Shape]]:
    """Image ``index`` of the dataset with ``seed``: the picture and its 1..``max_shapes`` shapes."""
    rng = random.Random(f"{seed}:{index}")
    image = _background(rng, size, size)
    boxes = _place(rng, size, size, rng.randint(1, max_shapes))
    objects = [Shape(rng.choice(shapes), rng.choice(list(COLORS)), box) for box in boxes]
    draw = ImageDraw.Draw(image)
    for shape in objects:
        _draw(draw, shape)
    return image, objects


QUESTION_TYPES = ("count", "count_kind", "exists", "color", "position", "shape")


def questions(objects: list[Shape], width: int, shapes: tuple[str, ...]) -> list[dict[str, str]]:
    """Every question template that has one right answer for this image."""
    out = [{"type": "count", "question": "how many shapes are there?", "answer": NUMBERS[len(objects)]}]
    for color in sorted({o.color for o in objects}):
        mine = [o for o in objects if o.color == color]
        if len(mine) == 1:
            out.append({"type": "shape", "question": f"what shape is the {color} one?", "answer": mine[0].kind})
    for kind in shapes:
        mine = [o for o in objects if o.kind == kind]
        out.append({"type": "count_kind", "question": f"how many {kind}s are there?", "answer": NUMBERS[len(mine)]})
        out.append({"type": "exists", "question": f"is there a {kind}?", "answer": "yes" if mine else "no"})
        if len(mine) == 1:
            (one,) = mine
            out.append({"type": "color", "question": f"what color is the {kind}?", "answer": one.color})
            side = "left" if (one.box[0] + one.box[2]) / 2 < width / 2 else "right"
            out.append({"type": "position", "question": f"is the {kind} on the left or the right?", "answer": side})
    return out


def generate(
    out: str | Path,
    n: int,
    seed: int = 0,
    size: int = 112,
    shapes: tuple[str, ...] = DEFAULT_SHAPES,
    questions_per_image: int = 2,
    max_shapes: int = 4,
    question_types: tuple[str, ...] = QUESTION_TYPES,
    masks: bool = False,
) -> Path:
    """Write ``n`` images with COCO annotations and VQA questions to ``out`` (see the module docstring).

    Each image gets ``questions_per_image`` questions of distinct types drawn from ``question_types``. With
    ``masks`` each annotation also has its ``segmentation``: the drawn shape's pixels as compressed RLE.
    """
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown or not shapes:
        raise ValueError(f"--shapes must be some of {', '.join(SHAPES)}, got {list(shapes)}")
    if not set(question_types) <= set(QUESTION_TYPES):
        raise ValueError(f"question types must be some of {', '.join(QUESTION_TYPES)}, got {list(question_types)}")
    if not 1 <= max_shapes <= 4:
        raise ValueError(f"--max-shapes must be 1 to 4, got {max_shapes}")
    root = Path(out)
    (root / "images").mkdir(parents=True, exist_ok=True)
    category = {name: i + 1 for i, name in enumerate(shapes)}
    coco: dict[str, Any] = {
        "info": {"description": f"synthetic shapes, seed {seed}, 1-{max_shapes} per image", "version": "1"},
        "images": [],
        "annotations": [],
        "categories": [{"id": i, "name": name, "supercategory": "shape"} for name, i in category.items()],
    }
    vqa_lines: list[str] = []
    for index in range(n):
        image, objects = render(seed, index, size, shapes, max_shapes)
        file_name = f"images/{index:06d}.png"
        image.save(root / file_name, compress_level=1)  # fast; the files stay small anyway
        coco["images"].append({"id": index, "file_name": file_name, "width": size, "height": size})
        for shape in objects:
            x1, y1, x2, y2 = shape.box
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]) + 1,
                    "image_id": index,
                    "category_id": category[shape.kind],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                    "color": shape.color,
                    **({"segmentation": mask_rle(shape, size)} if masks else {}),
                }
            )
        rng = random.Random(f"{seed}:{index}:vqa")
        by_type: dict[str, list[dict[str, str]]] = {}
        for qa in questions(objects, size, shapes):
            if qa["type"] in question_types:
                by_type.setdefault(qa["type"], []).append(qa)
        for kind in rng.sample(sorted(by_type), min(questions_per_image, len(by_type))):  # types balanced
            vqa_lines.append(json.dumps({"image": file_name, **rng.choice(by_type[kind])}))
    (root / "annotations.json").write_text(json.dumps(coco) + "\n")
    (root / "vqa.jsonl").write_text("\n".join(vqa_lines) + "\n")
    return root


PHOTO_BACKGROUNDS = 12
"""Distinct backgrounds a photo set cycles through (each takes 0.1 s to make; the shapes differ per photo)."""


def _photo_background(rng: random.Random, width: int, height: int) -> Image.Image:
    """Large colour regions, mid-scale shading and sensor-like noise: JPEG sizes of real photos."""
    gen = np.random.default_rng(rng.getrandbits(32))
    coarse = Image.fromarray(gen.uniform(30, 200, (6, 10, 3)).astype(np.uint8))
    field = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    shade = Image.fromarray(gen.uniform(-25, 25, (max(1, height // 8), max(1, width // 8))).astype(np.float32))
    shading = np.asarray(shade.resize((width, height), Image.Resampling.BILINEAR))[..., None]
    noise = gen.normal(0.0, 7.0, (height, width, 1)).astype(np.float32)
    return Image.fromarray(np.clip(field + shading + noise, 0, 255).astype(np.uint8))


def generate_photos(
    out: str | Path,
    n: int,
    seed: int = 0,
    width: int = 1920,
    height: int = 1080,
    quality: int = 90,
    shapes: tuple[str, ...] = DEFAULT_SHAPES,
    max_shapes: int = 4,
) -> Path:
    """Write ``n`` photo-sized JPEGs (``OUT/images/000000.jpg`` ...) and ``OUT/annotations.json`` (COCO);
    the backgrounds repeat every ``PHOTO_BACKGROUNDS`` photos, the shapes on them do not."""
    root = Path(out)
    (root / "images").mkdir(parents=True, exist_ok=True)
    category = {name: i + 1 for i, name in enumerate(shapes)}
    coco: dict[str, Any] = {
        "images": [],
        "annotations": [],
        "categories": [{"id": i, "name": name} for name, i in category.items()],
    }
    backgrounds: dict[int, Image.Image] = {}
    for index in range(n):
        rng = random.Random(f"photo:{seed}:{index}")
        key = index % PHOTO_BACKGROUNDS
        if key not in backgrounds:
            backgrounds[key] = _photo_background(random.Random(f"photo-background:{seed}:{key}"), width, height)
        image = backgrounds[key].copy()
        draw = ImageDraw.Draw(image)
        file_name = f"images/{index:06d}.jpg"
        for box in _place(rng, width, height, rng.randint(1, max_shapes)):
            shape = Shape(rng.choice(shapes), rng.choice(list(COLORS)), box)
            _draw(draw, shape)
            x1, y1, x2, y2 = box
            ann = {"id": len(coco["annotations"]) + 1, "image_id": index, "category_id": category[shape.kind]}
            coco["annotations"].append({**ann, "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": 0})
        image.save(root / file_name, quality=quality)
        coco["images"].append({"id": index, "file_name": file_name, "width": width, "height": height})
    (root / "annotations.json").write_text(json.dumps(coco) + "\n")
    return root


def generate_cached(out: str | Path, n: int, seed: int = 0, *, photos: bool = False, **options: Any) -> Path:
    """:func:`generate` (:func:`generate_photos` with ``photos``), unless ``out`` already holds a set made
    with the same arguments (defaults included), recorded in ``out/synth.json``; otherwise the folder is
    replaced."""
    import inspect
    import shutil

    make = generate_photos if photos else generate
    bound = inspect.signature(make).bind(out, n, seed, **options)
    bound.apply_defaults()
    wanted = {k: list(v) if isinstance(v, tuple) else v for k, v in bound.arguments.items() if k != "out"}
    if photos:  # shapes sets keep their old stamps (no needless regeneration)
        wanted["generator"] = "photos"
    root = Path(out)
    stamp = root / "synth.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return root
    shutil.rmtree(root, ignore_errors=True)
    make(out, n, seed, **options)
    stamp.write_text(json.dumps(wanted) + "\n")
    return root
