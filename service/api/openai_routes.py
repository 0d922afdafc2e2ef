"""OpenAI-compatible routes: ``GET /v1/models`` and ``POST /v1/chat/completions`` over the same engine.

PaliGemma has no chat template, so a chat request is mapped onto a task prefix here: the one user message
holds one image (a ``data:`` URL; nothing is fetched) and one text part. The text is a task prefix
(``detect cat ; dog``, ``segment cat``, ``caption en``, ``describe en``, ``ocr``, ``answer en ...``),
validated by :mod:`paligemma.prompts` as on the task endpoints; any other text is asked as a question.
``model`` is the served model or a LoRA adapter. Generation, the detection grammar, admission, auth,
deadlines, drain, image limits and metrics are the task endpoints' own (:func:`decode_and_generate`).

For ``detect`` and ``segment`` the message content is PaliGemma's raw text (``<loc...>`` tokens kept), and
the response adds ``detections``: the same objects ``/detect`` returns. ``stream: true`` sends OpenAI's
chunk events; the engines return whole answers, so the content arrives as one chunk.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from paligemma import prompts
from paligemma.grammar import DEFAULT_MAX_OBJECTS
from service.api.detections import labelled_detections, to_response
from service.api.openai_schemas import ChatCompletionRequest, ImagePart, Model, ModelList, OpenAIErrorResponse, TextPart
from service.api.routes import decode_and_generate, inline_schema
from service.deps import EngineDep, StateDep
from service.engines.protocol import Generation
from service.errors import BadRequest, ModelNotFound, Unavailable
from service.guards.middleware import request_id_of

router = APIRouter(prefix="/v1", tags=["openai"])
CREATED = int(time.time())
"""``created`` of every model in ``/v1/models``: when this process started."""


@dataclass(frozen=True)
class _Params:
    """What :func:`decode_and_generate` reads from a task endpoint's fields."""

    max_new_tokens: int | None
    adapter: str | None
    constrained: bool = True
    max_objects: int = DEFAULT_MAX_OBJECTS


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": OpenAIErrorResponse, "description": text}
    for status, text in (
        (400, "Unreadable body or image, or a request PaliGemma cannot answer (see the message and param)"),
        (404, "model_not_found: not the served model nor a loaded adapter"),
        (413, "Body or image too large"),
        (415, "An image format outside JPEG/PNG/WEBP/GIF/BMP"),
        (422, "A text that cannot become a prompt, or max_tokens above the server's limit"),
        (503, "Model not ready, overloaded or unavailable"),
    )
}
_COMPLETION = {
    "application/json": {"schema": {"type": "object", "description": "chat.completion"}},
    "text/event-stream": {"schema": {"type": "string", "description": "chat.completion.chunk events"}},
}


@router.get(
    "/models",
    response_model=ModelList,
    responses={503: ERRORS[503]},
    summary="The base model and every LoRA adapter (OpenAI list format)",
)
async def models(state: StateDep, engine: EngineDep) -> ModelList:
    names = [engine.model_name, *sorted(state.settings.loras)]
    return ModelList(data=[Model(id=name, created=CREATED, owned_by="paligemma-serve") for name in names])


def task_of(text: str) -> tuple[str, str, list[str]]:
    """``(task, prefix, objects)`` for a text part; unknown text becomes ``answer en <text>``."""
    word, _, rest = text.strip().partition(" ")
    rest = rest.strip()
    if word in ("detect", "segment"):
        objects = prompts.split_objects(rest)
        return word, prompts.detect(objects) if word == "detect" else prompts.segment(objects), objects
    if word in ("caption", "describe") and len(rest.split()) <= 1:
        lang = rest or "en"
        return word, prompts.caption(lang) if word == "caption" else prompts.describe(lang), []
    if word == "ocr" and not rest:
        return "ocr", prompts.ocr(), []
    if word == "answer" and len(rest.split(" ", 1)) == 2:
        lang, question = rest.split(" ", 1)
        return "answer", prompts.answer(question, lang), []
    return "answer", prompts.answer(text), []


def _parse(body: bytes) -> ChatCompletionRequest:
    try:
        return ChatCompletionRequest.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise BadRequest(f"{param or 'body'}: {first['msg']}", code="invalid_request", param=param) from None


def _image_and_text(chat: ChatCompletionRequest) -> tuple[str, str]:
    """The one image (its data URL, decoded in the upload worker) and the one text of the single user message."""
    users = [i for i, m in enumerate(chat.messages) if m.role == "user"]
    if len(users) != 1 or any(m.role == "assistant" for m in chat.messages):
        raise BadRequest("send exactly one user message (PaliGemma answers one turn)", code="unsupported_messages")
    index = users[0]
    content = chat.messages[index].content
    parts = content if isinstance(content, list) else []
    images = [p for p in parts if isinstance(p, ImagePart)]
    texts = [p.text for p in parts if isinstance(p, TextPart)]
    param = f"messages.{index}.content"
    if len(images) != 1:
        message = f"the user message needs exactly one image_url part, got {len(images)}"
        raise BadRequest(message, code="unsupported_content", param=param)
    if len(texts) != 1:
        message = f"the user message needs exactly one text part, got {len(texts)}"
        raise BadRequest(message, code="unsupported_content", param=param)
    url = images[0].image_url.url
    if url[:8].lower().startswith(("http://", "https://")):  # not url.lower(): a photo is megabytes of text
        raise BadRequest(
            "image URLs are not fetched; send the image as a data:image/...;base64,... URL",
            code="image_url_not_supported",
            param=f"{param}.image_url.url",
        )
    if not url.startswith("data:"):
        raise BadRequest("image_url.url must be a data: URL", code="bad_image_url", param=f"{param}.image_url.url")
    return url, texts[0]


def _check_sampling(chat: ChatCompletionRequest) -> None:
    if chat.temperature not in (None, 0):
        raise BadRequest(
            "temperature must be 0: the engines decode greedily", code="unsupported_value", param="temperature"
        )
    if chat.n not in (None, 1):
        raise BadRequest("n must be 1", code="unsupported_value", param="n")


def _logprobs(generation: Generation, tokenizer: Any, top: bool) -> dict[str, Any]:
    content = []
    for token_id, logprob in zip(generation.token_ids, generation.logprobs, strict=False):
        token = str(tokenizer.decode([token_id], skip_special_tokens=False))
        entry = {"token": token, "logprob": logprob, "bytes": list(token.encode())}
        content.append({**entry, "top_logprobs": [entry] if top else []})
    return {"content": content}


@router.post(
    "/chat/completions",
    summary="Chat completion: one image and one task prefix",
    responses={
        200: {
            "description": "The completion; with stream: true, server-sent chunk events ending with data: [DONE]",
            "content": {
                "application/json": {"schema": _COMPLETION},
                "text/event-stream": {"schema": {"type": "string"}},
            },
        },
        **ERRORS,
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": inline_schema(ChatCompletionRequest)}},
        }
    },
)
async def chat_completions(request: Request, state: StateDep, engine: EngineDep) -> Any:
    """OpenAI's chat completion (greedy, one choice); ``detections`` added for detect and segment."""
    start = time.time()
    chat = _parse(await request.body())
    _check_sampling(chat)
    adapter = None
    if chat.model != engine.model_name:
        if chat.model not in state.settings.loras:
            raise ModelNotFound(f"the model {chat.model!r} does not exist; GET /v1/models lists them", param="model")
        adapter = chat.model
    data, text = _image_and_text(chat)
    task, prefix, objects = task_of(text)
    params = _Params(chat.max_completion_tokens or chat.max_tokens, adapter)
    labels = objects if task in ("detect", "segment") else None
    upload, generation = await decode_and_generate(
        request, state, engine, prefix, params, data, labels=labels, segment=task == "segment"
    )
    if state.special_ids is None:
        raise Unavailable()
    completion_id = f"chatcmpl-{request_id_of(request.scope) or int(start * 1000)}"
    finish = "stop" if generation.finish_reason == "stop" else "length"
    usage = {
        "prompt_tokens": generation.prompt_tokens,
        "completion_tokens": generation.completion_tokens,
        "total_tokens": generation.prompt_tokens + generation.completion_tokens,
    }
    logprobs = _logprobs(generation, engine.tokenizer(), bool(chat.top_logprobs)) if chat.logprobs else None
    head = {"id": completion_id, "created": int(start), "model": chat.model}
    extension: dict[str, Any] = {}
    if labels is not None:
        found, _ = labelled_detections(
            generation, upload.width, upload.height, objects, state.special_ids, engine.tokenizer()
        )
        extension["detections"] = [to_response(d).model_dump() for d in found]
    if chat.stream:
        include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
        events = _chunks(head, generation.text, logprobs, finish, usage if include_usage else None, extension)
        return StreamingResponse(events, media_type="text/event-stream")
    message = {"role": "assistant", "content": generation.text}
    choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": logprobs}
    body = {**head, "object": "chat.completion", "choices": [choice], "usage": usage, **extension}
    return JSONResponse(body)


def _chunks(
    head: dict[str, Any],
    text: str,
    logprobs: dict[str, Any] | None,
    finish: str,
    usage: dict[str, int] | None,
    extension: dict[str, Any],
) -> Iterator[str]:
    """Server-sent events in OpenAI's ``chat.completion.chunk`` format, ending with ``data: [DONE]``."""

    def event(choices: list[dict[str, Any]], **more: Any) -> str:
        return f"data: {json.dumps({**head, 'object': 'chat.completion.chunk', 'choices': choices, **more})}\n\n"

    yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
    yield event([{"index": 0, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": None}])
    yield event([{"index": 0, "delta": {}, "finish_reason": finish}], **extension)
    if usage is not None:
        yield event([], usage=usage)
    yield "data: [DONE]\n\n"
