"""Image intake on a hostile corpus: allow-list, limits, EXIF orientation and every mode to RGB."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from service.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from service.images import ImageLimits, decode_image, to_rgb
from tests.service.conftest import image_bytes

LIMITS = ImageLimits(max_bytes=2_000_000, max_pixels=1_000_000, max_aspect_ratio=20)


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("RGB", "PNG"),
        ("RGB", "JPEG"),
        ("RGB", "WEBP"),
        ("RGB", "BMP"),
        ("P", "GIF"),
        ("L", "PNG"),
        ("1", "PNG"),
        ("CMYK", "JPEG"),
        ("I;16", "PNG"),
    ],
)
def test_allowed_formats_and_modes_decode_to_rgb(mode: str, fmt: str) -> None:
    image = decode_image(image_bytes((40, 30), mode=mode, fmt=fmt), LIMITS)
    assert image.mode == "RGB"
    assert image.size == (40, 30)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparent_pixels_are_composited_on_white(mode: str) -> None:
    image = decode_image(image_bytes((8, 8), mode=mode), LIMITS)
    assert image.getpixel((3, 3)) == (255, 255, 255)


def test_palette_transparency_is_composited_on_white() -> None:
    source = Image.new("P", (8, 8), 0)
    source.putpalette([0, 0, 0] * 256)
    buffer = io.BytesIO()
    source.save(buffer, format="PNG", transparency=0)
    assert decode_image(buffer.getvalue(), LIMITS).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    source = Image.fromarray(np.full((4, 4), 65535 // 2, dtype=np.uint16))
    buffer = io.BytesIO()
    source.save(buffer, format="PNG")
    red, _, _ = decode_image(buffer.getvalue(), LIMITS).getpixel((0, 0))  # type: ignore[misc]
    assert 120 <= red <= 135


@pytest.mark.parametrize(("mode", "value", "expected"), [("I", 65535, 255), ("F", 1.0, 255), ("F", 0.5, 127)])
def test_wide_modes_are_scaled_to_8_bit(mode: str, value: float, expected: int) -> None:
    image = to_rgb(Image.new(mode, (2, 2), value))
    assert image.mode == "RGB"
    assert abs(image.getpixel((0, 0))[0] - expected) <= 1  # type: ignore[index]


def test_exif_orientation_is_applied() -> None:
    source = Image.new("RGB", (60, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    source.save(buffer, format="JPEG", exif=exif)
    assert decode_image(buffer.getvalue(), LIMITS).size == (20, 60)


def test_animated_gif_gives_first_frame() -> None:
    frames = [Image.new("P", (10, 10), i) for i in (1, 2, 3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    assert decode_image(buffer.getvalue(), LIMITS).size == (10, 10)


@pytest.mark.parametrize("fmt", ["TIFF", "PDF", "ICO"])
def test_other_image_formats_are_unsupported(fmt: str) -> None:
    with pytest.raises(UnsupportedMediaType) as info:
        decode_image(image_bytes((16, 16), fmt=fmt), LIMITS)
    assert info.value.code == "unsupported_image_format"


@pytest.mark.parametrize("data", [b"", os.urandom(300), image_bytes(fmt="PNG")[:-40], image_bytes(fmt="JPEG")[:200]])
def test_empty_random_and_truncated_bytes_are_bad_images(data: bytes) -> None:
    with pytest.raises(BadRequest) as info:
        decode_image(data, LIMITS)
    assert info.value.code == "bad_image"
    assert "0x" not in info.value.message and "BytesIO" not in info.value.message


def test_pixel_limit_raises_before_decoding() -> None:
    bomb = image_bytes((2000, 1000), mode="L")  # 2 MP, compresses to a few KB
    assert len(bomb) < 20_000
    with pytest.raises(PayloadTooLarge) as info:
        decode_image(bomb, LIMITS)
    assert info.value.code == "image_too_large"


def test_byte_limit() -> None:
    with pytest.raises(PayloadTooLarge):
        decode_image(image_bytes(), ImageLimits(max_bytes=10, max_pixels=10**6, max_aspect_ratio=20))


@pytest.mark.parametrize("size", [(1, 100), (100, 1), (500, 10)])
def test_aspect_ratio_limit(size: tuple[int, int]) -> None:
    with pytest.raises(BadRequest):
        decode_image(image_bytes(size), LIMITS)


def test_one_pixel_image_is_accepted() -> None:
    assert decode_image(image_bytes((1, 1)), LIMITS).size == (1, 1)
