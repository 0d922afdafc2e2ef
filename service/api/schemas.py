"""Request and response bodies (pydantic only, no FastAPI, so ``service.client`` can reuse them).

Request models are flat on purpose: the same model validates a multipart form and a JSON body, and its
JSON schema is pasted into the OpenAPI document for both content types.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.config import JsonDict

from paligemma.grammar import DEFAULT_MAX_OBJECTS

_PNG_1PX = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
MaxNewTokens = Field(None, ge=1, description="Tokens to generate at most (default and limit: server settings)")


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_new_tokens: int | None = MaxNewTokens
    adapter: str | None = Field(
        None, max_length=200, description="LoRA adapter started with --lora NAME=PATH (vLLM engine); none = base model"
    )


class DetectParams(_Params):
    """Fields of ``POST /detect`` besides the image."""

    objects: list[str] | str = Field(
        description='Object names: "cat ; dog", a list, or (multipart) repeated fields', examples=["cat ; dog"]
    )
    constrained: bool = Field(
        True,
        description="Decode with the detection grammar: only whole objects (4 locs, y2 > y1, x2 > x1; 16 segs for "
        "/segment) with a requested label, none repeated; false = the model writes freely",
    )
    max_objects: int = Field(
        DEFAULT_MAX_OBJECTS, ge=1, le=256, description="With constrained: the answer ends after this many objects"
    )


class VQAParams(_Params):
    """Fields of ``POST /vqa`` besides the image."""

    question: str = Field(examples=["what color is the car?"])
    lang: str = Field("en", description="Language code of question and answer", examples=["en"])


class CaptionParams(_Params):
    """Fields of ``POST /caption`` besides the image."""

    lang: str = Field("en", examples=["en"])
    detail: Literal["short", "long"] = Field("short", description="short = 'caption', long = 'describe'")


class OCRParams(_Params):
    """Fields of ``POST /ocr`` besides the image."""


class _JSONImage(BaseModel):
    image: str = Field(description="The image file, base64 (a data: URL prefix is accepted)", examples=[_PNG_1PX])


class DetectJSON(DetectParams, _JSONImage):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"image": _PNG_1PX, "objects": ["cat", "dog"]}]}
    )


class VQAJSON(VQAParams, _JSONImage):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"image": _PNG_1PX, "question": "what is in the image?"}]}
    )


class CaptionJSON(CaptionParams, _JSONImage):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"image": _PNG_1PX, "lang": "en", "detail": "short"}]}
    )


class OCRJSON(OCRParams, _JSONImage):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"image": _PNG_1PX}]})


class Box(BaseModel):
    """Corners, x right and y down: pixels of the uploaded image after EXIF rotation, or 0..1."""

    x1: float
    y1: float
    x2: float
    y2: float


class Detection(BaseModel):
    label: str
    box: Box
    box_normalized: Box
    score: float | None = Field(
        description="exp(mean log-probability) of the 4 loc tokens and the label tokens, i.e. the geometric "
        "mean of their probabilities (0..1)"
    )


class ImageInfo(BaseModel):
    width: int
    height: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


_TEXT = Field(description="What the model generated (loc tokens kept)")


_USAGE: JsonDict = {"prompt_tokens": 262, "completion_tokens": 11}


class DetectResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "detections": [
                        {
                            "label": "cat",
                            "box": {"x1": 25.0, "y1": 10.0, "x2": 200.0, "y2": 40.0},
                            "box_normalized": {"x1": 0.125, "y1": 0.25, "x2": 1.0, "y2": 1.0},
                            "score": 0.91,
                        }
                    ],
                    "image": {"width": 200, "height": 40},
                    "model": "paligemma-3b-mix-224",
                    "text": "<loc0256><loc0128><loc1023><loc1023> cat",
                    "usage": _USAGE,
                    "latency_ms": 182.4,
                }
            ]
        }
    )
    detections: list[Detection]
    image: ImageInfo
    model: str
    text: str = _TEXT
    usage: Usage
    latency_ms: float


class VQAResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "answer": "red",
                    "score": 0.87,
                    "model": "paligemma-3b-mix-224",
                    "text": "red",
                    "usage": _USAGE,
                    "latency_ms": 95.0,
                }
            ]
        }
    )
    answer: str
    score: float | None = Field(description="Geometric mean of the answer tokens' probabilities")
    model: str
    text: str = _TEXT
    usage: Usage
    latency_ms: float


class TextResponse(BaseModel):
    """``/caption`` and ``/ocr``: ``text`` is the caption or the text read."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "text": "a red car parked on a street",
                    "score": 0.42,
                    "model": "paligemma-3b-mix-224",
                    "usage": _USAGE,
                    "latency_ms": 140.0,
                }
            ]
        }
    )
    text: str = Field(description="The caption, or the text read")
    score: float | None = Field(description="Geometric mean of the generated tokens' probabilities")
    model: str
    usage: Usage
    latency_ms: float


class ErrorDetail(BaseModel):
    code: str = Field(examples=["bad_image"])
    message: str = Field(examples=["the image could not be decoded"])
    request_id: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Status(BaseModel):
    status: str
    model: str | None = None
    engine: str | None = None


# --- /segment (issue 8) -------------------------------------------------------------------------------------


class SegmentParams(DetectParams):
    """Fields of ``POST /segment`` besides the image."""

    polygons: bool = Field(False, description="Also return each mask's outer boundaries as polygons")


class SegmentJSON(SegmentParams, _JSONImage):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"image": _PNG_1PX, "objects": ["cat"], "polygons": True}]}
    )


class RLE(BaseModel):
    """COCO compressed RLE of the full-image mask: ``pycocotools.mask.decode`` gives it back (column-major)."""

    size: list[int] = Field(description="[height, width] of the image", examples=[[40, 200]])
    counts: str = Field(description="COCO compressed run-length string", examples=["`0a0Q1U2"])


class Mask(BaseModel):
    rle: RLE
    area: int = Field(description="Pixels inside the mask")
    polygons: list[list[int]] | None = Field(
        None,
        description="Only with polygons=true: outer boundaries of the mask's parts, each a flat "
        "[x1, y1, x2, y2, ...] list of pixel coordinates (holes not represented; use rle when exactness matters)",
    )


class SegmentDetection(Detection):
    mask: Mask | None = Field(
        description="The mask pasted into the box, or null when the model's <seg> run was not 16 tokens "
        "or the box is empty in whole pixels"
    )


class SegmentResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "detections": [
                        {
                            "label": "cat",
                            "box": {"x1": 25.0, "y1": 10.0, "x2": 200.0, "y2": 40.0},
                            "box_normalized": {"x1": 0.125, "y1": 0.25, "x2": 1.0, "y2": 1.0},
                            "score": 0.91,
                            "mask": {
                                "rle": {"size": [40, 200], "counts": "Y:8`0O1O0O100O100O1N2M3N2N2O1O1O0O2N1O]6"},
                                "area": 3412,
                                "polygons": [[60, 10, 25, 24, 60, 39, 199, 39, 199, 10]],
                            },
                        }
                    ],
                    "image": {"width": 200, "height": 40},
                    "model": "paligemma-3b-mix-224",
                    "text": "<loc0256><loc0128><loc1023><loc1023>" + "<seg012>" * 16 + " cat",
                    "usage": {"prompt_tokens": 262, "completion_tokens": 27},
                    "latency_ms": 240.3,
                }
            ]
        }
    )
    detections: list[SegmentDetection]
    image: ImageInfo
    model: str
    text: str = _TEXT
    usage: Usage
    latency_ms: float
