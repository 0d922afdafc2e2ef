"""Service fixtures: one app on the tiny checkpoint (real transformers engine), images made in memory."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.settings import Settings


def image_bytes(size: tuple[int, int] = (64, 48), mode: str = "RGB", fmt: str = "PNG", **save: object) -> bytes:
    color: object = (200, 30, 30) if mode in ("RGB", "CMYK") else 128
    if mode in ("RGBA", "LA"):
        color = (200, 30, 30, 0) if mode == "RGBA" else (128, 0)
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format=fmt, **save)  # type: ignore[arg-type]
    return buffer.getvalue()


def make_settings(checkpoint: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "model": str(checkpoint),
        "engine": "transformers",
        "max_new_tokens": 6,
        "max_new_tokens_limit": 64,
        "max_batch_size": 16,
        "batch_window_ms": 10,
        "max_image_bytes": 256 * 1024,
        "max_image_pixels": 4_000_000,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def settings(tiny_checkpoint: Path) -> Settings:
    return make_settings(tiny_checkpoint)


@pytest.fixture(scope="session")
def client(settings: Settings) -> Iterator[TestClient]:
    """The app with its lifespan running (engine loaded) for the whole session."""
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def png() -> bytes:
    return image_bytes()
