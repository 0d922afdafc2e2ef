"""Uploads resized to the model's input in the upload workers give the model exactly the pixels it got
from the whole image, through both engines' own processors (issue 36); the JPEG draft option is opt-in."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import signal
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from service.errors import BadRequest, PayloadTooLarge, ServiceError
from service.images import ImageLimits, decode_image, decode_upload
from service.model_input import Resize, UploadPool, load_resize, prepare, resize_of
from tests.photos import photo

DEMO = Path(__file__).resolve().parents[2] / "models" / "demo"
LIMITS = ImageLimits(max_bytes=20 * 2**20, max_pixels=40_000_000, max_aspect_ratio=20.0)


def _textured(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """Noise over gradients: every resize weight shows in the result (a flat image would hide them)."""
    width, height = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x + y) % 256], axis=-1)
    pixels = np.clip(base + rng.integers(-40, 40, (height, width, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def _encode(image: Image.Image, fmt: str, **save: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


@cache
def cases() -> dict[str, bytes]:
    rgb = _textured((640, 480))
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(np.tile((np.arange(640) % 256).astype(np.uint8)[None, :], (480, 1))))
    gray16 = Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).astype(np.uint16))
    palette = rgb.quantize(64)
    palette.info["transparency"] = 3
    cases = {
        "1080p-jpeg": photo("1080p"),
        "12mp-jpeg": photo("12mp"),
        "12mp-portrait-exif8": photo("12mp-portrait-exif8"),
        "tall-png": _encode(_textured((300, 1400), seed=1), "PNG"),
        "smaller-than-input-png": _encode(_textured((50, 37), seed=2), "PNG"),
        "input-size-png": _encode(_textured((112, 112), seed=3), "PNG"),
        "rgba-png": _encode(rgba, "PNG"),
        "la-png": _encode(rgba.convert("LA"), "PNG"),
        "p-transparency-png": _encode(palette, "PNG"),
        "cmyk-jpeg": _encode(rgb.convert("CMYK"), "JPEG", quality=90),
        "gray16-png": _encode(gray16, "PNG"),
        "webp": _encode(rgb, "WEBP", quality=80),
    }
    for orientation in range(1, 9):
        cases[f"jpeg-exif{orientation}"] = _encode(rgb, "JPEG", quality=90, exif=_exif(orientation))
    return cases


NAMES = [
    *("1080p-jpeg", "12mp-jpeg", "12mp-portrait-exif8", "tall-png", "smaller-than-input-png", "input-size-png"),
    *("rgba-png", "la-png", "p-transparency-png", "cmyk-jpeg", "gray16-png", "webp"),
    *(f"jpeg-exif{orientation}" for orientation in range(1, 9)),
]


@pytest.fixture(scope="module")
def hf_processor() -> Any:
    """The processor the transformers engine loads for the demo model (service.engines.hf_model)."""
    from transformers import PaliGemmaProcessor

    return PaliGemmaProcessor.from_pretrained(DEMO)


@pytest.fixture(scope="module")
def vllm_processor() -> Any:
    """vLLM's multimodal processor for the demo model, built from the service's own engine config."""
    from vllm.multimodal import MULTIMODAL_REGISTRY

    from service.engines.vllm_config import engine_config
    from service.engines.vllm_plugin import register
    from service.settings import Settings

    register()
    config = engine_config(Settings(model=str(DEMO), engine="vllm"), False)  # type: ignore[call-arg]
    return MULTIMODAL_REGISTRY.create_processor(config.model_config)


def _hf_pixels(processor: Any, image: Image.Image) -> torch.Tensor:
    """As HFEngine._generate_batch calls it."""
    return processor(text=["<image>detect cat\n"], images=[image], return_tensors="pt")["pixel_values"]


def _vllm_pixels(processor: Any, image: Image.Image) -> torch.Tensor:
    """vLLM's own call of the HF processor (BaseMultiModalProcessor._call_hf_processor)."""
    return processor._call_hf_processor({"text": "detect cat", "images": [image]}, {})["pixel_values"]


@pytest.fixture(scope="module")
def resize() -> Resize:
    found = load_resize(DEMO)
    assert found == Resize(112, 112, "bicubic")
    return found


def test_both_engines_processors_resize_as_load_resize_says(
    hf_processor: Any, vllm_processor: Any, resize: Resize
) -> None:
    assert resize_of(hf_processor.image_processor) == resize
    assert resize_of(vllm_processor.info.get_hf_processor().image_processor) == resize


def test_the_cases_are_the_named_ones() -> None:
    assert sorted(cases()) == sorted(NAMES)


@pytest.mark.parametrize("case", NAMES)
def test_model_input_is_bit_identical_on_both_engines(
    case: str, hf_processor: Any, vllm_processor: Any, resize: Resize
) -> None:
    data = cases()[case]
    whole = decode_image(data, LIMITS)  # what the engines were given before issue 36
    upload = prepare(data, LIMITS, resize)
    assert upload.image.size == (112, 112)  # nothing bigger than the model's input reaches an engine
    assert (upload.width, upload.height) == whole.size
    assert torch.equal(_hf_pixels(hf_processor, upload.image), _hf_pixels(hf_processor, whole))
    assert torch.equal(_vllm_pixels(vllm_processor, upload.image), _vllm_pixels(vllm_processor, whole))


def test_base64_text_is_decoded_in_the_worker_to_the_same_upload(pool: UploadPool) -> None:
    """JSON bodies carry the image as base64 text (a data URL in chat requests); the worker decodes it."""
    data = cases()["1080p-jpeg"]
    text = base64.b64encode(data).decode()
    wrapped = "\n".join(text[i : i + 76] for i in range(0, len(text), 76))  # MIME line breaks
    uploads = [asyncio.run(pool.prepare(d)) for d in (data, text, "data:image/jpeg;base64," + wrapped)]
    assert len({(u.image.tobytes(), u.width, u.height, u.digest) for u in uploads}) == 1


def test_jpeg_draft_decodes_less_and_keeps_the_size_boxes_are_in(resize: Resize) -> None:
    data = photo("12mp-portrait-exif8")
    drafted, displayed = decode_upload(data, LIMITS, draft=(112, 112))
    assert displayed == (3024, 4032)
    assert drafted.size == (3024 // 8, 4032 // 8)  # the JPEG decoder's 1/8 scale still covers 112 px
    exact, fast = prepare(data, LIMITS, resize), prepare(data, LIMITS, resize, draft=True)
    assert (fast.width, fast.height, fast.image.size) == (exact.width, exact.height, exact.image.size)
    difference = np.abs(np.asarray(fast.image, dtype=int) - np.asarray(exact.image, dtype=int))
    assert 0 < difference.mean() < 3  # other pixels, close ones
    png = cases()["tall-png"]
    assert prepare(png, LIMITS, resize, draft=True).image == prepare(png, LIMITS, resize).image  # JPEG only


@pytest.fixture(scope="module")
def pool(resize: Resize) -> Iterator[UploadPool]:
    uploads = UploadPool(2, LIMITS, resize)
    asyncio.run(uploads.start())
    yield uploads
    uploads.shutdown()


@pytest.mark.parametrize(
    ("data", "error", "code"),
    [
        (photo("1080p")[:200_000], BadRequest, "bad_image"),
        (_encode(Image.new("L", (1, 30)), "PNG"), BadRequest, "bad_image"),
        (_encode(Image.new("L", (8000, 6000)), "PNG"), PayloadTooLarge, "image_too_large"),
        ("data:image/png;base64,!!!not base64!!!", BadRequest, "bad_base64"),
        ("A" * (4 * (20 * 2**20) // 3 + 8), PayloadTooLarge, "image_too_large"),
    ],
)
def test_worker_errors_arrive_whole(pool: UploadPool, data: bytes | str, error: type[ServiceError], code: str) -> None:
    """Raised in a worker, answered with the same status and code (the hostile corpus checks them over HTTP)."""
    with pytest.raises(error) as raised:
        asyncio.run(pool.prepare(data))
    assert (raised.value.code, type(raised.value)) == (code, error)


def test_a_killed_worker_is_replaced_and_the_upload_still_answered(pool: UploadPool) -> None:
    import psutil

    async def run() -> tuple[int, int]:
        pending = asyncio.ensure_future(pool.prepare(cases()["12mp-jpeg"]))
        await asyncio.sleep(0.3)  # the 12 MP decode takes longer than this in a worker
        workers = [p for p in psutil.Process().children() if "spawn_main" in " ".join(p.cmdline())]
        for worker in workers:
            os.kill(worker.pid, signal.SIGKILL)
        upload = await pending
        return upload.width, len(workers)

    width, killed = asyncio.run(run())
    assert killed >= 1
    assert width == 4032
    assert asyncio.run(pool.prepare(cases()["webp"])).width == 640  # the new workers serve the next one


def test_without_a_reproduced_resize_the_engine_gets_the_whole_image() -> None:
    """A processor :func:`resize_of` does not reproduce (here: none): whole images, and workers without torch."""
    uploads = UploadPool(1, LIMITS, None)
    try:
        upload = asyncio.run(uploads.prepare(cases()["jpeg-exif6"]))
    finally:
        uploads.shutdown()
    assert upload.image.size == (upload.width, upload.height) == (480, 640)  # stored 640x480, EXIF-rotated
    assert upload.image.tobytes() == decode_image(cases()["jpeg-exif6"], LIMITS).tobytes()
