"""Service settings: one pydantic-settings model, read from ``PALIGEMMA_*`` variables and CLI flags.

``Settings`` is built once in ``service.__main__`` (or by a test) and passed to ``create_app``; nothing
reads it from a module global, so tests can run several apps with different settings side by side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

EngineKind = Literal["auto", "transformers", "vllm"]
Device = Literal["auto", "cuda", "mps", "cpu"]
DType = Literal["auto", "bfloat16", "float16", "float32"]

PILLOW_MAX_IMAGE_PIXELS = 89_478_485
"""Pillow's own bomb threshold; our limit must stay at or below it so our check always fires first."""


class Settings(BaseSettings):
    """Everything the service can be told; each field is also ``--field-name`` on ``python -m service``."""

    model_config = SettingsConfigDict(env_prefix="PALIGEMMA_", extra="ignore", protected_namespaces=())

    model: str = Field("", validate_default=True, description="Checkpoint directory, or a hub id when online")
    engine: EngineKind = Field("auto", description="auto picks the best engine available")
    model_name: str | None = Field(None, description="Name used in responses and metrics (default: from model)")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    device: Device = Field("auto", description="auto = cuda, then mps, then cpu")
    dtype: DType = Field("auto", description="auto = bfloat16 on a GPU, float32 on the CPU")

    max_batch_size: int = Field(8, ge=1, le=256, description="Most requests padded into one generate call")
    batch_window_ms: float = Field(5.0, ge=0, le=1000, description="How long a batch waits to fill up")
    max_queue_size: int = Field(256, ge=1, description="Requests waiting in the engine beyond this get 503")

    max_new_tokens: int = Field(64, ge=1, description="Default generation length per request")
    max_new_tokens_limit: int = Field(512, ge=1, description="Largest max_new_tokens a request may ask for")

    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1, description="Largest image file accepted (bytes)")
    max_image_pixels: int = Field(40_000_000, ge=1, le=PILLOW_MAX_IMAGE_PIXELS)
    max_aspect_ratio: float = Field(20.0, ge=1.0, description="Longest side / shortest side")
    decode_threads: int = Field(2, ge=1, le=64, description="Threads that decode uploaded images")

    @field_validator("model")
    @classmethod
    def _model_given(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("set --model or PALIGEMMA_MODEL to a checkpoint directory or hub id")
        return value.strip()

    @model_validator(mode="after")
    def _limits_consistent(self) -> Settings:
        if self.max_new_tokens > self.max_new_tokens_limit:
            raise ValueError("max_new_tokens must not exceed max_new_tokens_limit")
        return self

    @property
    def served_model_name(self) -> str:
        """``model_name`` or the checkpoint directory's name / the hub id."""
        if self.model_name:
            return self.model_name
        path = Path(self.model)
        return path.resolve().name if path.exists() else self.model

    @property
    def max_body_bytes(self) -> int:
        """Largest request body: the image as base64 (4/3 of the bytes) plus 64 KiB for the other fields."""
        return self.max_image_bytes * 4 // 3 + 4 + 64 * 1024
