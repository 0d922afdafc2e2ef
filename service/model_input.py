"""Uploaded bytes -> the model's input image, made early, once, in worker processes.

Why: PaliGemma sees one fixed square (224, 448 or 896 px) that its processor makes with one known resize.
A 12-megapixel phone photo is 36 MB of decoded pixels, and every step on them (decode, EXIF rotation, RGB
conversion, the processor's tensor conversion and resize) used to run in the API process: about 15 ms of
its GIL per photo, which capped one server at ~65 photos/s however many cores the host had (issue 36).

Here the whole path runs in a pool of worker processes (:class:`UploadPool`): the checks and decoding of
:mod:`service.images`, then :func:`resize_exact`, the processor's own resize (torchvision's antialiased
kernel on uint8, the call the processor makes). The API process gets back the model-sized image (150 KB at
224 px); the processor then finds it at its size and leaves it as it is, so ``pixel_values`` are
bit-identical to processing the whole upload (tests/service/test_model_input.py, through both engines).
A processor this module cannot reproduce (another backend or resize) gets the whole image, as before.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from service.errors import BadRequest
from service.images import ImageLimits, decode_upload, image_bytes

log = logging.getLogger(__name__)

WORKER_NICE = 5
"""How many nice levels below the API process the workers run: its event loop takes a core from a 12-megapixel
decode at once (GIL held while waiting for a core is GIL lost to every request), the workers still get every
cycle it leaves, and on a CPU host they stay above the model (``model_nice``, 10), which waits on them."""
REPRODUCED = ("nearest", "bilinear", "bicubic")
"""torchvision interpolations whose uint8 kernels :func:`resize_exact` calls as the processor does."""


@dataclass(frozen=True)
class Resize:
    """The processor's resize: to ``height`` x ``width`` with torchvision's ``interpolation``, antialiased."""

    height: int
    width: int
    interpolation: str


def resize_of(image_processor: Any) -> Resize | None:
    """The fixed-size resize ``image_processor`` applies, or None if it is not one :func:`resize_exact`
    reproduces (a PIL-backend processor, an aspect-keeping size, LANCZOS)."""
    from transformers.image_processing_backends import TorchvisionBackend
    from transformers.image_utils import pil_torch_interpolation_mapping

    if not isinstance(image_processor, TorchvisionBackend):
        return None
    proc: Any = image_processor  # its attributes come from the checkpoint's config: untyped
    size = proc.size
    if not (proc.do_resize and size is not None and size.height and size.width):
        return None
    resample = proc.resample
    mapping: dict[Any, Any] = pil_torch_interpolation_mapping
    mode = mapping[resample] if isinstance(resample, int) else resample
    value = str(getattr(mode, "value", mode))
    return Resize(int(size.height), int(size.width), value) if value in REPRODUCED else None


def load_resize(model: str | Path) -> Resize | None:
    """:func:`resize_of` the image processor saved with ``model`` (a checkpoint directory or hub id; an
    adapter directory without its own processor files uses its base's, as the engines do)."""
    from transformers import AutoImageProcessor

    from paligemma.checkpoint import adapter_base, is_adapter

    source = str(model)
    if is_adapter(source) and not (Path(source) / "preprocessor_config.json").is_file():
        source = adapter_base(source) or source
    return resize_of(AutoImageProcessor.from_pretrained(source))  # type: ignore[no-untyped-call]


def resize_exact(image: Image.Image, resize: Resize) -> Image.Image:
    """``image`` (RGB) resized as the processor resizes it: ``pil_to_tensor``, stacked as the processor
    groups it, then ``torchvision.transforms.v2.functional.resize`` with antialiasing on uint8."""
    import torchvision.transforms.v2.functional as tvF  # noqa: N812  (torchvision's own alias)

    if image.size == (resize.width, resize.height):
        return image  # the processor's resize leaves an image of its size unchanged (checked in the tests)
    tensor = tvF.pil_to_tensor(image).unsqueeze(0)
    mode = tvF.InterpolationMode(resize.interpolation)
    resized = tvF.resize(tensor, [resize.height, resize.width], interpolation=mode, antialias=True)
    return Image.fromarray(resized[0].permute(1, 2, 0).numpy())


@dataclass(frozen=True)
class Upload:
    """One decoded upload."""

    image: Image.Image
    """What the engine gets: the model's input when the resize is reproduced, else the whole image."""
    width: int
    """The upload as displayed (after EXIF orientation): boxes and masks are in its pixels."""
    height: int
    digest: str
    """SHA-256 of the bytes: the same bytes always give the same image, so it names it (vLLM's cache key)."""
    seconds: float
    """Decode and resize time in the worker."""


def prepare(data: bytes | str, limits: ImageLimits, resize: Resize | None, draft: bool = False) -> Upload:
    """Bytes (or base64 text, :func:`service.images.image_bytes`) -> :class:`Upload`; raises only
    :mod:`service.errors` types (they cross the process boundary). ``draft``: decode a JPEG at 1/2, 1/4 or
    1/8 scale when that still covers the model's input."""
    start = time.perf_counter()
    data = image_bytes(data, limits.max_bytes)
    target = (max(resize.width, resize.height),) * 2 if draft and resize is not None else None
    image, (width, height) = decode_upload(data, limits, draft=target)
    if resize is not None:
        image = resize_exact(image, resize)
    return Upload(image, width, height, hashlib.sha256(data).hexdigest(), time.perf_counter() - start)


def _start_worker(resizes: bool) -> None:
    """Each worker runs :data:`WORKER_NICE` levels down and, when it resizes, imports torch and torchvision
    now (the first request does not pay for them) with one torch thread: the pool is the parallelism."""
    os.nice(WORKER_NICE)
    if resizes:
        import torch
        import torchvision.transforms.v2.functional  # noqa: F401

        torch.set_num_threads(1)


def _ready() -> int:
    """A task that only shows a worker is up (its initializer has run)."""
    return multiprocessing.current_process().pid or 0


class UploadPool:
    """``workers`` processes that run :func:`prepare`. Started with ``spawn``: the API process has threads
    (the engine's) by then, and forking those is unsafe. A worker that dies (a decoder crash, the OOM killer)
    breaks the whole pool: it is replaced, the uploads it held are tried once more, and one that breaks it
    again is answered as undecodable."""

    def __init__(self, workers: int, limits: ImageLimits, resize: Resize | None, draft: bool = False) -> None:
        self.workers, self.limits, self.resize, self.draft = workers, limits, resize, draft
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        context = multiprocessing.get_context("spawn")
        return ProcessPoolExecutor(
            self.workers, mp_context=context, initializer=_start_worker, initargs=(self.resize is not None,)
        )

    async def start(self) -> None:
        """Spawn every worker now and wait until one has imported its libraries."""
        await asyncio.gather(*(asyncio.wrap_future(self._pool.submit(_ready)) for _ in range(self.workers)))

    async def prepare(self, data: bytes | str) -> Upload:
        """:func:`prepare` in a worker, awaited without blocking the event loop."""
        for _ in range(2):
            pool = self._pool
            try:
                return await asyncio.wrap_future(pool.submit(prepare, data, self.limits, self.resize, self.draft))
            except BrokenProcessPool:
                if pool is self._pool:  # the first to see it replaces it; the others retry on the new one
                    log.error("an image worker process died; starting new ones")
                    pool.shutdown(wait=False, cancel_futures=True)
                    self._pool = self._new_pool()
        raise BadRequest("the image could not be decoded", code="bad_image")

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
