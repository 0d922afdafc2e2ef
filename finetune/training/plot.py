"""A learning-curve PNG drawn with Pillow (matplotlib is not a dependency of the CPU stack).

Left axis: training loss per logged step (blue line). Right axis, 0-1: held-out scores at snapshot points
(e.g. mAP@0.5 green, VQA accuracy orange), drawn as markers joined by lines.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

SIZE = (760, 420)
MARGIN = (64, 52, 64, 48)  # left, top, right, bottom
LOSS_COLOR = (30, 110, 255)
SERIES_COLORS = ((0, 160, 70), (230, 120, 0), (150, 60, 200), (200, 40, 40))


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def learning_curve_png(
    loss: Sequence[tuple[float, float]],
    scores: Mapping[str, Sequence[tuple[float, float]]],
    out: str | Path,
    title: str = "learning curve",
    x_label: str = "step",
) -> Path:
    """``loss``: (x, loss) points; ``scores``: name -> (x, value in [0, 1]) points. Writes ``out``."""
    image = Image.new("RGB", SIZE, "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(15), _font(12)
    left, top, right, bottom = MARGIN[0], MARGIN[1], SIZE[0] - MARGIN[2], SIZE[1] - MARGIN[3]
    xs = [x for x, _ in loss] + [x for series in scores.values() for x, _ in series]
    x_max = max(xs) if xs else 1.0
    y_max = max((y for _, y in loss), default=1.0) * 1.05 or 1.0

    def px(x: float, y: float, y_top: float) -> tuple[float, float]:
        return left + (right - left) * x / x_max, bottom - (bottom - top) * y / y_top

    draw.rectangle((left, top, right, bottom), outline=(0, 0, 0))
    for i in range(6):  # grid and tick labels
        frac = i / 5
        y = bottom - (bottom - top) * frac
        draw.line((left, y, right, y), fill=(225, 225, 225))
        draw.text((left - 6, y), f"{y_max * frac:.2f}", fill=LOSS_COLOR, font=small, anchor="rm")
        draw.text((right + 6, y), f"{frac:.1f}", fill=(0, 0, 0), font=small, anchor="lm")
        x = left + (right - left) * frac
        draw.text((x, bottom + 6), f"{x_max * frac:.0f}", fill=(0, 0, 0), font=small, anchor="mt")
    if len(loss) > 1:
        draw.line([px(x, y, y_max) for x, y in loss], fill=LOSS_COLOR, width=2)
    legend = [("training loss (left axis)", LOSS_COLOR)]
    for (name, series), color in zip(scores.items(), SERIES_COLORS, strict=False):
        points = [px(x, y, 1.0) for x, y in series]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for x, y in points:
            draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=color)
        legend.append((f"{name} (right axis)", color))
    draw.text((left, 6), title, fill=(0, 0, 0), font=font)
    draw.text(((left + right) / 2, SIZE[1] - 18), x_label, fill=(0, 0, 0), font=small, anchor="mm")
    lx = float(left)
    for text, color in legend:  # one row between the title and the plot
        draw.rectangle((lx, 31, lx + 14, 39), fill=color)
        draw.text((lx + 20, 28), text, fill=(0, 0, 0), font=small)
        lx += 20 + draw.textlength(text, font=small) + 16
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
