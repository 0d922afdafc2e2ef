"""Photo-sized uploads for the intake tests: made here, deterministically (Pillow's JPEG encoder gives the
same bytes for the same pixels), so a recorded answer names exactly one input."""

from __future__ import annotations

import io
import tempfile
from functools import cache
from pathlib import Path

from PIL import Image

PHOTOS = ("1080p", "1080p-exif6", "1080p-exif3", "12mp", "12mp-portrait-exif8")
"""Which photos the answers are recorded for: a full-HD and a 12-megapixel JPEG, and EXIF-rotated ones."""


@cache
def _generated(width: int, height: int, index: int) -> Image.Image:
    from finetune.data.synth import generate_photos

    with tempfile.TemporaryDirectory() as tmp:
        root = generate_photos(tmp, index + 1, seed=36, width=width, height=height, max_shapes=3)
        with Image.open(root / "images" / f"{index:06d}.jpg") as image:
            return image.convert("RGB")


def _jpeg(image: Image.Image, orientation: int = 1, quality: int = 90) -> bytes:
    """``image`` stored so that a viewer applying EXIF ``orientation`` shows it as given."""
    stored = image.transpose(_STORE[orientation]) if orientation in _STORE else image
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", quality=quality, exif=exif.tobytes())
    return buffer.getvalue()


_STORE = {  # the transpose that, undone by exif_transpose for that orientation, gives the image back
    3: Image.Transpose.ROTATE_180,
    6: Image.Transpose.ROTATE_90,
    8: Image.Transpose.ROTATE_270,
}


@cache
def photo(name: str) -> bytes:
    """The JPEG bytes of one of :data:`PHOTOS`."""
    if name == "1080p":
        return _jpeg(_generated(1920, 1080, 0))
    if name == "1080p-exif6":
        return _jpeg(_generated(1920, 1080, 1), orientation=6)
    if name == "1080p-exif3":
        return _jpeg(_generated(1920, 1080, 2), orientation=3)
    if name == "12mp":
        return _jpeg(_generated(4032, 3024, 0))
    if name == "12mp-portrait-exif8":
        return _jpeg(_generated(3024, 4032, 1), orientation=8)
    raise KeyError(name)


def save_all(out: Path) -> None:
    """Write every photo to ``out`` (to look at them)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        (out / f"{name}.jpg").write_bytes(photo(name))
