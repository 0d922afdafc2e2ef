"""``GET /`` (the page), ``GET /examples`` (the pictures its example buttons offer) and the example files.

The examples are held-out images of the committed demo models (``service/static/examples``, listed in its
``examples.json`` with the seed and index that ``finetune.data.synth.render`` makes them from), so a newcomer's
first click gives boxes. They are only images: with another served model they still run, just less well.
Like the page, they are open to everyone and outside admission (:func:`service.guards.admission.is_exempt`).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from service.api.schemas import ErrorResponse

STATIC = Path(__file__).resolve().parents[1] / "static"
EXAMPLES = STATIC / "examples"

router = APIRouter(tags=["page"])


class ExampleSource(BaseModel):
    """How the picture was made: ``finetune.data.synth.render(seed, index, shapes=shapes)``."""

    seed: int
    index: int
    shapes: list[str]


class Example(BaseModel):
    file: str = Field(pattern=r"^[a-z0-9-]+\.png$")
    title: str
    task: str = Field(description="The task the page runs when the example is clicked")
    objects: str = Field(description="What the page asks for, as typed in its objects field")
    note: str = ""
    source: ExampleSource
    url: str = Field("", description="Where to get the picture, relative to the service")


class ExampleList(BaseModel):
    examples: list[Example]


@lru_cache(maxsize=1)
def load_examples() -> ExampleList:
    """The committed manifest, each entry with its ``url``; read once per process."""
    listed = ExampleList.model_validate(json.loads((EXAMPLES / "examples.json").read_text()))
    return ExampleList(examples=[e.model_copy(update={"url": f"/examples/{e.file}"}) for e in listed.examples])


@router.get("/", response_class=HTMLResponse, summary="The page to try the model in a browser")
async def page() -> FileResponse:
    """Click an example or pick an image, see boxes and masks drawn over it (no build step, no external assets)."""
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")


@router.get("/examples", response_model=ExampleList, summary="Example pictures for the page")
async def examples() -> ExampleList:
    return load_examples()


@router.get(
    "/examples/{file}",
    response_class=FileResponse,
    responses={
        200: {
            "description": "The picture",
            "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
        },
        404: {"model": ErrorResponse, "description": "Not a listed example"},
    },
    summary="One example picture (PNG)",
)
async def example_file(file: str) -> FileResponse:
    """Only files the manifest lists are served, so no path reaches outside the folder."""
    if file not in {e.file for e in load_examples().examples}:
        raise HTTPException(404, f"no example named {file!r}; GET /examples lists them")
    return FileResponse(EXAMPLES / file, media_type="image/png", headers={"Cache-Control": "public, max-age=3600"})
