"""Pictures of detections: boxes, labels, scores and masks drawn on the image with Pillow.

The convention users know from the PaliGemma finetune walkthroughs: ground truth in green, predictions
in blue. Used by ``/detect?annotated=true`` and by the finetune evaluator's comparison pictures.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import numpy as np
from PIL import Image, ImageDraw, ImageFont

GROUND_TRUTH = (0, 200, 70)
PREDICTION = (30, 110, 255)


class Drawable(Protocol):
    """Anything with a pixel box ``(x1, y1, x2, y2)`` and a label; score and mask are optional."""

    @property
    def label(self) -> str | None: ...
    @property
    def box(self) -> tuple[float, float, float, float]: ...


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow built without FreeType
        return ImageFont.load_default()


def _caption(det: Any, show_score: bool) -> str:
    text = det.label or "?"
    score = getattr(det, "score", None)
    return f"{text} {score:.2f}" if show_score and score is not None else text


def draw_detections(
    image: Image.Image,
    detections: Iterable[Drawable],
    *,
    color: tuple[int, int, int] = PREDICTION,
    show_score: bool = True,
    mask_alpha: float = 0.45,
) -> Image.Image:
    """A copy of ``image`` (RGB) with each detection's mask, box and ``label score`` drawn in ``color``."""
    canvas = image.convert("RGB")
    detections = list(detections)
    for det in detections:
        mask = getattr(det, "mask", None)
        if mask is not None:
            canvas = _blend_mask(canvas, np.asarray(mask, dtype=bool), color, mask_alpha)
    draw = ImageDraw.Draw(canvas)
    line = max(2, round(min(canvas.size) / 150))
    font = _font(max(11, round(min(canvas.size) / 28)))
    for det in detections:
        x1, y1, x2, y2 = det.box
        draw.rectangle((x1, y1, x2, y2), outline=color, width=line)
        text = _caption(det, show_score)
        left, top, right, bottom = draw.textbbox((x1, y1), text, font=font)
        lift = bottom - top + 2 * line
        ty = y1 - lift if y1 - lift >= 0 else y1  # above the box when there is room
        draw.rectangle((x1, ty, x1 + right - left + 2 * line, ty + lift), fill=color)
        draw.text((x1 + line, ty + line - (top - y1)), text, fill=(255, 255, 255), font=font)
    return canvas


def _blend_mask(image: Image.Image, mask: np.ndarray, color: tuple[int, int, int], alpha: float) -> Image.Image:
    if mask.shape != (image.height, image.width):
        return image
    pixels = np.asarray(image, dtype=np.float32)
    pixels[mask] = (1 - alpha) * pixels[mask] + alpha * np.asarray(color, dtype=np.float32)
    return Image.fromarray(pixels.astype(np.uint8))


def side_by_side(panels: Sequence[Image.Image], titles: Sequence[str] = (), gap: int = 8) -> Image.Image:
    """Panels in one row on white, each with an optional title above it."""
    font = _font(14)
    title_h = 22 if titles else 0
    width = sum(p.width for p in panels) + gap * (len(panels) + 1)
    height = max(p.height for p in panels) + title_h + 2 * gap
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    x = gap
    for i, panel in enumerate(panels):
        if i < len(titles):
            draw.text((x, gap), titles[i], fill=(0, 0, 0), font=font)
        sheet.paste(panel.convert("RGB"), (x, gap + title_h))
        x += panel.width + gap
    return sheet


def contact_sheet(images: Sequence[Image.Image], columns: int = 4, gap: int = 8) -> Image.Image:
    """A grid of images (row-major) on white, for a quick look at many results in one PNG."""
    if not images:
        raise ValueError("contact_sheet needs at least one image")
    cell_w = max(im.width for im in images)
    cell_h = max(im.height for im in images)
    columns = max(1, min(columns, len(images)))
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * (cell_w + gap) + gap, rows * (cell_h + gap) + gap), "white")
    for i, im in enumerate(images):
        row, col = divmod(i, columns)
        sheet.paste(im.convert("RGB"), (gap + col * (cell_w + gap), gap + row * (cell_h + gap)))
    return sheet
