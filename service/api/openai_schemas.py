"""The slice of OpenAI's chat-completions request that a PaliGemma server can honour (pydantic only).

Unknown fields are ignored, as OpenAI's own API does, so SDKs and tools that send more still work; fields
that would change the answer in a way PaliGemma cannot (sampling, several choices) are refused by the
route with a clear 400 instead.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Lenient):
    url: str = Field(description="A `data:image/...;base64,...` URL; http(s) URLs are refused (nothing is fetched)")


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageURL


class TextPart(_Lenient):
    type: Literal["text"]
    text: str = Field(
        description="A task prefix (`detect cat ; dog`, `segment cat`, `caption en`, `describe en`, `ocr`, "
        "`answer en what is this?`); any other text is asked as a question (`answer en <text>`)"
    )


class Message(_Lenient):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart | ImagePart] | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatCompletionRequest(_Lenient):
    """``POST /v1/chat/completions``: one user message with one image part and one text part."""

    model: str = Field(description="The served model's name (GET /v1/models) or a LoRA adapter's")
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, description="0 only: the engines decode greedily")
    n: int | None = Field(None, description="1 only")
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20, description="Only the chosen token is listed")
    user: str | None = None


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error (4xx) or server_error (5xx)")
    param: str | None = Field(description="The request field at fault, when there is one")
    code: str | None


class OpenAIErrorResponse(BaseModel):
    """OpenAI's error shape, used on every ``/v1/*`` route (the request id is the ``X-Request-ID`` header)."""

    error: OpenAIErrorDetail


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]
