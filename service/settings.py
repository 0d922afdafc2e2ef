"""Service settings: one pydantic-settings model, read from ``PALIGEMMA_*`` variables and CLI flags.

``Settings`` is built once in ``service.__main__`` (or by a test) and passed to ``create_app``; nothing
reads it from a module global, so tests can run several apps with different settings side by side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

EngineKind = Literal["auto", "transformers", "vllm"]
Device = Literal["auto", "cuda", "mps", "cpu"]
DType = Literal["auto", "bfloat16", "float16", "float32"]

PILLOW_MAX_IMAGE_PIXELS = 89_478_485
"""Pillow's own bomb threshold; our limit must stay at or below it so our check always fires first."""


class Settings(BaseSettings):
    """Everything the service can be told; each field is also ``--field-name`` on ``python -m service``."""

    model_config = SettingsConfigDict(env_prefix="PALIGEMMA_", extra="ignore", protected_namespaces=())

    model: str = Field(
        "",
        validate_default=True,
        description="Checkpoint directory, or a hub id when online; transformers engine: also a LoRA adapter directory",
    )
    engine: EngineKind = Field("auto", description="auto picks the best engine available")
    model_name: str | None = Field(None, description="Name used in responses and metrics (default: from model)")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    device: Device = Field("auto", description="auto = cuda, then mps, then cpu")
    dtype: DType = Field(
        "auto",
        description="auto = bfloat16 on a GPU; on the CPU the checkpoint's dtype if it is bfloat16 and the CPU runs "
        "bfloat16 (AVX2 and up), else float32 (service/engines/precision.py)",
    )
    keep_sliding_window: bool = Field(
        False,
        description="PaliGemma 2: keep the checkpoint's Gemma 2 sliding window (default: every text layer global, "
        "as big_vision trained PaliGemma 2; differs only at 896 px, docs/how-paligemma-works.md section 8)",
    )

    max_batch_size: int = Field(8, ge=1, le=256, description="Most requests padded into one generate call")
    batch_window_ms: float = Field(5.0, ge=0, le=1000, description="How long a batch waits to fill up")
    max_queue_size: int = Field(256, ge=1, description="Requests waiting in the engine beyond this get 503")

    max_new_tokens: int = Field(64, ge=1, description="Default generation length per request")
    max_new_tokens_limit: int = Field(512, ge=1, description="Largest max_new_tokens a request may ask for")

    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1, description="Largest image file accepted (bytes)")
    max_image_pixels: int = Field(40_000_000, ge=1, le=PILLOW_MAX_IMAGE_PIXELS)
    max_aspect_ratio: float = Field(20.0, ge=1.0, description="Longest side / shortest side")
    decode_workers: Literal["auto"] | Annotated[int, Field(ge=1, le=64)] = Field(
        "auto",
        description="Processes that decode uploads and resize them to the model's input (service/model_input.py); "
        "auto = half the usable cores, 2 to 8",
    )
    jpeg_draft: bool = Field(
        False,
        description="Decode JPEGs at 1/2, 1/4 or 1/8 scale when that still covers the model's input: several "
        "times less decode work, slightly different pixels (docs/performance.md has its effect on mAP)",
    )
    torch_threads: Literal["auto"] | Annotated[int, Field(ge=1)] = Field(
        "auto",
        description="The model's CPU threads; auto = OMP_NUM_THREADS if set, else usable cores - decode workers - 1 "
        "(at least 1); the rest of the cores are left to the API process (service/engines/cpu_threads.py)",
    )
    model_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="On a CPU host, how many nice levels below the API process the model's threads run (0 = the "
        "same): probes and request parsing take a core at once, the model gets the cycles left over",
    )

    request_timeout_s: float = Field(120.0, gt=0, description="Deadline per request; past it: 504, engine aborted")

    # Reliability and security (issue 6): admission control, drain on SIGTERM, bearer keys, image URLs
    max_concurrent_requests: int = Field(
        64, ge=1, description="Inference requests processed at once (body read, decode, engine)"
    )
    max_queued_requests: int = Field(
        64, ge=0, description="Inference requests waiting for a slot (body not read yet); beyond: 503 + Retry-After"
    )
    drain_timeout_s: float = Field(30.0, ge=0, description="After SIGTERM: seconds in-flight requests get to finish")
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="Bearer keys for the inference routes, comma-separated; empty = no auth"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Origins whose pages may call the API (CORS), comma-separated, e.g. https://app.example.com; "
        "empty = same origin only; '*' = any (never with cookies or credentials: keys go in Authorization)",
    )

    # vLLM engine (names follow vLLM's AsyncEngineArgs; ignored by the transformers engine)
    max_model_len: int | None = Field(
        None,
        ge=16,
        description="vLLM: longest prompt + output in tokens; default: the checkpoint's image tokens + 2 + "
        "max_prompt_tokens + max_new_tokens_limit (1,026 at 224 px), so the KV cache holds many sequences",
    )
    max_prompt_tokens: int = Field(
        256, ge=1, description="vLLM: prompt text tokens a request is sized for (part of the default max_model_len)"
    )
    max_num_seqs: int = Field(32, ge=1, description="vLLM: most sequences decoded together")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vLLM: share of GPU memory to use")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM: GPUs per model replica (tensor parallel)")
    data_parallel_size: int = Field(1, ge=1, description="vLLM: model replicas in this process (data parallel)")
    enforce_eager: bool = Field(False, description="vLLM: no CUDA graphs / compilation (faster start)")
    kv_cache_gib: float | None = Field(None, gt=0, description="vLLM: KV cache size in GiB (CPU: default 4)")
    lora: list[str] = Field(
        default_factory=list, description="vLLM: LoRA adapter as NAME=PATH, repeatable; requests pick it by name"
    )
    max_lora_rank: int = Field(16, ge=1, le=512, description="vLLM: largest adapter rank (raised to fit --lora)")

    # Segmentation (issue 8): big_vision's mask decoder weights; without them /segment answers 503
    segmentation_weights: Path | None = Field(
        None, description="big_vision's vae-oid.npz (mask decoder for /segment); unset: /segment answers 503"
    )

    @field_validator("model")
    @classmethod
    def _model_given(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("set --model or PALIGEMMA_MODEL to a checkpoint directory or hub id")
        return value.strip()

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        """``PALIGEMMA_API_KEYS=key1,key2`` (or repeated ``--api-keys``): comma-separated, blanks dropped."""
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list):
            return value
        parts = [p for i in items for p in (i.split(",") if isinstance(i, str) else [i])]
        return [p.strip() if isinstance(p, str) else p for p in parts if not isinstance(p, str) or p.strip()]

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        """``PALIGEMMA_CORS_ORIGINS=https://a,https://b`` (or repeated ``--cors-origins``)."""
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list):
            return value
        parts = [p.strip() for i in items for p in str(i).split(",")]
        for origin in parts:
            if origin and origin != "*" and not origin.startswith(("http://", "https://")):
                raise ValueError(f"a CORS origin is scheme://host[:port], got {origin!r}")
        return [p.rstrip("/") for p in parts if p]

    @field_validator("lora")
    @classmethod
    def _lora_pairs(cls, value: list[str]) -> list[str]:
        for item in value:
            name, sep, path = item.partition("=")
            if not sep or not name.strip() or not path.strip():
                raise ValueError(f"--lora takes NAME=PATH, got {item!r}")
        return value

    @property
    def loras(self) -> dict[str, str]:
        """``--lora`` entries as adapter name -> adapter directory."""
        return {name.strip(): path.strip() for name, _, path in (i.partition("=") for i in self.lora)}

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
