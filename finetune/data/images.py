"""Training images: checked from their headers when the data loads, decoded one item at a time while training.

Why: memory must not grow with the dataset. A 1080p photo is 6 MB decoded, so 10,000 kept images are 60 GB;
instead each image is decoded when a batch needs it and resized at once to the processor's input size (a
224-px image is 150 KB) with the processor's own resize, so the pixels the model sees are unchanged. With
``--workers`` > 0 this runs in the DataLoader's worker processes.

Why the header check: a bad file (empty, not an image, a decompression bomb, a phone photo annotated in its
stored orientation) should be a reported record when the data loads, not a crash hours into training.
Opening the header reads a few KB and decodes no pixel: seconds for 10,000 files. A file whose pixel data
is bad (a truncated JPEG) still passes; :class:`finetune.data.collate.ExampleDataset` handles that one.

Decoding is the service's :func:`service.images.decode_image` (format allow-list, pixel limit, truncated
files fail, EXIF orientation, 16-bit grayscale scaled, CMYK and alpha to RGB): one decoder for training and
serving, so a model is trained on the pixels it will be served.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, NamedTuple

from PIL import ExifTags, Image

from finetune.data.records import DataError
from service.errors import ServiceError
from service.images import SWAPPING_ORIENTATIONS, ImageLimits, decode_image, open_header
from service.model_input import resize_exact, resize_of
from service.settings import PILLOW_MAX_IMAGE_PIXELS

TRAINING_LIMITS = ImageLimits(max_bytes=200 * 2**20, max_pixels=PILLOW_MAX_IMAGE_PIXELS, max_aspect_ratio=20.0)
"""Wider than the service's: phones take 50-megapixel photos; Pillow's own bomb limit still holds."""
ASPECT_TOLERANCE = 0.02
"""A COCO record whose width/height ratio differs more than this from the displayed image's is reported."""


class BadImage(Exception):
    """An image file that cannot be trained on, and why (the service's public error message)."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


class ImageInfo(NamedTuple):
    width: int
    """In display orientation (after EXIF orientation), as the decoder returns the image."""
    height: int
    orientation: int
    """EXIF orientation, 1 (as stored) to 8."""


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation the decoder's ``exif_transpose`` will apply, read without decoding pixels."""
    if image.format == "PNG" and "exif" not in image.info:
        return 1  # an eXIf chunk after the pixel data is only read with them (Pillow's getexif would decode)
    with contextlib.suppress(Exception):  # unreadable EXIF: the decoder keeps the stored orientation too
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
        return value if isinstance(value, int) and 1 <= value <= 8 else 1
    return 1


def inspect_image(path: Path | str, limits: ImageLimits = TRAINING_LIMITS) -> ImageInfo:
    """Size in display orientation and EXIF orientation, from the header only; :class:`BadImage` if the
    file is missing, empty, too large, not an allowed image format, or of impossible geometry."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise BadImage(path, f"cannot be read ({exc.strerror or exc})") from None
    if size == 0:
        raise BadImage(path, "the image is empty")
    if size > limits.max_bytes:
        raise BadImage(path, f"image is larger than {limits.max_bytes} bytes")
    try:
        with path.open("rb") as fh, open_header(fh, limits) as image:
            width, height = image.size
            orientation = _orientation(image)
    except ServiceError as exc:
        raise BadImage(path, exc.message) from None
    except OSError as exc:
        raise BadImage(path, f"cannot be read ({exc.strerror or exc})") from None
    if orientation in SWAPPING_ORIENTATIONS:
        width, height = height, width
    return ImageInfo(width, height, orientation)


class ImageCheck:
    """The header checks of one loader: each distinct file is inspected once, however many records use it."""

    def __init__(self, limits: ImageLimits = TRAINING_LIMITS) -> None:
        self.limits = limits
        self._seen: dict[Path, ImageInfo | BadImage] = {}

    def __call__(self, path: Path, declared: tuple[int, int] | None = None) -> str | None:
        """Why ``path`` cannot be trained on (an issue's reason), or None. ``declared``: the record's
        ``(width, height)``; boxes are in its coordinates, so its shape must be the displayed image's."""
        if path not in self._seen:
            try:
                self._seen[path] = inspect_image(path, self.limits)
            except BadImage as exc:
                self._seen[path] = exc
        info = self._seen[path]
        if isinstance(info, BadImage):
            return f"bad image {info}"
        if declared is not None and not same_aspect((info.width, info.height), declared):
            return (
                f"image {path} is displayed as {info.width}x{info.height} (EXIF orientation {info.orientation}) "
                f"but the record says {declared[0]}x{declared[1]}: its boxes would not match the pixels"
            )
        return None


def same_aspect(a: tuple[int, int], b: tuple[int, int], tolerance: float = ASPECT_TOLERANCE) -> bool:
    """Width/height ratios within ``tolerance`` of each other (a record may give a scaled size)."""
    ratio = (a[0] / a[1]) / (b[0] / b[1])
    return max(ratio, 1 / ratio) <= 1 + tolerance


def load_training_image(
    path: Path | str, image_processor: Any = None, limits: ImageLimits = TRAINING_LIMITS
) -> Image.Image:
    """Decode ``path`` to RGB in display orientation, resized as ``image_processor`` resizes (if given).

    Raises :class:`finetune.data.DataError` with ``"FILE: REASON"``.
    """
    try:
        with Path(path).open("rb") as fh:
            data = fh.read(limits.max_bytes + 1)  # one byte more than allowed is enough to refuse it
        image = decode_image(data, limits)
    except ServiceError as exc:
        raise DataError(f"{path}: {exc.message}") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    return resize_like(image_processor, image) if image_processor is not None else image


def resize_like(image_processor: Any, image: Image.Image) -> Image.Image:
    """``image`` resized exactly as ``image_processor`` resizes it (the service's
    :func:`service.model_input.resize_exact`), so the processor then finds the image at its size and leaves
    it as it is, and its ``pixel_values`` equal those of the full image. Unchanged for a processor whose
    resize is not reproduced there."""
    resize = resize_of(image_processor)
    return image if resize is None else resize_exact(image, resize)
