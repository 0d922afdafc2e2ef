"""Safe image intake: untrusted bytes -> an RGB ``PIL.Image`` in display orientation, or a typed error.

Why each step (see ``shared/notes/reliability.md`` section 3):

- format allow-list (JPEG, PNG, WEBP, GIF, BMP): the exotic decoders (PSD, FITS, PDF, EPS, JPEG 2000, TGA)
  carry most of Pillow's CVEs and are never reached; the client's filename and Content-Type are ignored;
- the pixel limit is checked from the header, before any pixel is decoded, and raises (Pillow only warns
  below twice its own limit); Pillow's ``DecompressionBombWarning`` is turned into an error as well;
- truncated files fail (``LOAD_TRUNCATED_IMAGES`` stays False) and animated images give their first frame;
- ``ImageOps.exif_transpose`` first, so boxes are in the orientation the user sees;
- every mode becomes RGB; transparency is composited on white rather than dropped (dropping it turns
  transparent areas into whatever colour the encoder left there, often black).

Decoding is CPU work: the service runs it in worker processes (:mod:`service.model_input`), never on the
event loop.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import warnings
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from service.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
"""EXIF orientations that swap width and height."""

# Raise on Pillow's bomb warning (process-wide on purpose: nothing in this service wants the warning).
warnings.simplefilter("error", Image.DecompressionBombWarning)

# Magic numbers of image formats we recognise but refuse (415); anything else unreadable is a 400.
_KNOWN_OTHER_FORMATS: tuple[tuple[int, bytes], ...] = (
    (0, b"II*\x00"),  # TIFF little-endian
    (0, b"MM\x00*"),  # TIFF big-endian
    (0, b"8BPS"),  # PSD
    (0, b"%PDF"),
    (0, b"%!PS"),  # EPS
    (0, b"\xc5\xd0\xd3\xc6"),  # DOS EPS
    (0, b"\x00\x00\x00\x0cjP  "),  # JPEG 2000
    (0, b"\xffO\xffQ"),  # JPEG 2000 codestream
    (0, b"\x00\x00\x01\x00"),  # ICO
    (0, b"qoif"),
    (0, b"SIMPLE  ="),  # FITS
    (4, b"ftyp"),  # HEIC / AVIF
    (0, b"<svg"),
    (0, b"<?xml"),
)


@dataclass(frozen=True)
class ImageLimits:
    """Limits applied to every uploaded image."""

    max_bytes: int
    max_pixels: int
    max_aspect_ratio: float


def _is_other_image_format(data: bytes) -> bool:
    return any(data[offset : offset + len(magic)] == magic for offset, magic in _KNOWN_OTHER_FORMATS)


def _check_geometry(width: int, height: int, limits: ImageLimits) -> None:
    if width < 1 or height < 1:
        raise BadRequest("image has no pixels", code="bad_image")
    if width * height > limits.max_pixels:
        raise PayloadTooLarge(
            f"image has {width * height} pixels; the limit is {limits.max_pixels}", code="image_too_large"
        )
    if max(width, height) / min(width, height) > limits.max_aspect_ratio:
        raise BadRequest(
            f"image is {width}x{height}; the longest side may be at most {limits.max_aspect_ratio:g} times "
            "the shortest",
            code="bad_image",
        )


def open_header(source: BinaryIO, limits: ImageLimits) -> Image.Image:
    """Identify the format and check the header-declared size; no pixel is decoded yet (Pillow reads a few
    KB), so a dataset's files can be vetted before training without holding any of them."""
    try:
        image = Image.open(source, formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        source.seek(0)
        if _is_other_image_format(source.read(16)):
            raise UnsupportedMediaType(
                "image format not supported; send JPEG, PNG, WEBP, GIF or BMP", code="unsupported_image_format"
            ) from None
        raise BadRequest("the image could not be decoded", code="bad_image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PayloadTooLarge(f"image has more than {limits.max_pixels} pixels", code="image_too_large") from None
    except Exception:  # hostile headers make decoders raise nearly anything (OSError, SyntaxError, struct.error)
        raise BadRequest("the image could not be decoded", code="bad_image") from None
    _check_geometry(*image.size, limits)
    return image


def _open(
    data: bytes, limits: ImageLimits, draft: tuple[int, int] | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """Identify, check the header-declared size, then decode frame 0 (a JPEG at the smallest of 1/1, 1/2, 1/4,
    1/8 scale that still covers ``draft``, when given). Returns the image and its header-declared size."""
    image = open_header(io.BytesIO(data), limits)
    size = image.size
    if draft is not None and image.format == "JPEG":
        image.draft(None, draft)  # the decoder's own DCT scaling: far less work, other pixels
    try:
        image.load()  # frame 0 of animations; truncated data raises here
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PayloadTooLarge(f"image has more than {limits.max_pixels} pixels", code="image_too_large") from None
    except Exception:
        raise BadRequest("the image data is truncated or corrupt", code="bad_image") from None
    return image, size


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer / float grayscale -> ``L`` (Pillow's ``convert`` would clip, not scale)."""
    array = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        peak = float(np.nanmax(array)) if array.size else 0.0
        array = array * 255.0 if peak <= 1.0 else array / 257.0
    else:  # I;16*, I: 16-bit data (PNG, TIFF-like BMP) scaled by 65535 -> 255
        array = array / 257.0
    return Image.fromarray(np.clip(np.nan_to_num(array), 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB, alpha composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("F", "I") or image.mode.startswith("I;16"):
        image = _to_8bit(image)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode in ("P", "L", "RGB") and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def image_bytes(data: bytes | str, max_bytes: int) -> bytes:
    """The upload's bytes: ``data`` itself, or decoded from base64 text (a ``data:`` URL prefix and line breaks
    allowed) within the size limit. Base64 arrives as text from JSON bodies and is decoded where the image is,
    in an upload worker: for a phone photo that is 4 MB of text, milliseconds of the API process's GIL."""
    if isinstance(data, bytes):
        return data
    if data.startswith("data:"):  # data:image/png;base64,....
        data = data.partition(",")[2]
    compact = "".join(data.split())  # MIME-style line breaks are fine
    if len(compact) > 4 * ((max_bytes + 2) // 3):
        raise PayloadTooLarge(f"image is larger than {max_bytes} bytes", code="image_too_large")
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("image is not valid base64", code="bad_base64") from None


def decode_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Untrusted bytes -> RGB image in display orientation. Raises only :mod:`service.errors` types."""
    return decode_upload(data, limits)[0]


def decode_upload(
    data: bytes, limits: ImageLimits, draft: tuple[int, int] | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """:func:`decode_image`, and the upload's size as displayed (after EXIF orientation). With ``draft``, a
    JPEG is decoded at a reduced scale that still covers it, so the image may be smaller than that size."""
    if len(data) > limits.max_bytes:
        raise PayloadTooLarge(f"image is larger than {limits.max_bytes} bytes", code="image_too_large")
    if not data:
        raise BadRequest("the image is empty", code="bad_image")
    image, stored = _open(data, limits, draft)
    displayed = stored
    # Unreadable EXIF: keep the stored orientation rather than refuse the image.
    with contextlib.suppress(OSError, ValueError, SyntaxError, TypeError, KeyError):
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
        image = ImageOps.exif_transpose(image) or image
        if orientation in SWAPPING_ORIENTATIONS:
            displayed = (stored[1], stored[0])
    _check_geometry(*displayed, limits)
    try:
        return to_rgb(image), displayed
    except (OSError, ValueError):
        raise BadRequest("the image could not be converted to RGB", code="bad_image") from None
