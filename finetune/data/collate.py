"""Batches for prefix-LM training, built by ``PaliGemmaProcessor(..., suffix=...)`` (the maestro contract).

The processor builds ``<image>*N <bos> prefix \\n suffix <eos>`` with ``token_type_ids`` 0 on image + prefix
and 1 on suffix + eos, and ``labels`` = input ids with -100 wherever the type is 0. Two things are ours:

- padding goes on the **right** for training: PaliGemma's position ids ignore the attention mask, so left
  padding would shift every position of a short example (the processor's default is left, for generation);
- padding positions are forced to -100 in ``labels`` whatever their type id, so the loss never sees them.

``token_type_ids`` stay in the batch: the model builds the bidirectional prefix block from them.
With ``trim_logits`` (the default) the batch also carries transformers' ``logits_to_keep``, and ``labels``
are cut to match: the language-model head then runs only from the first suffix position on, not over
the image tokens and the prompt. Same loss; on the tiny CPU model a 32-example step took 0.16 s instead
of 0.19 s, and with a real 257k-token vocabulary the full logits of a batch would take gigabytes.
``truncation="only_second"`` means only the suffix is ever cut, never the image tokens or the prompt.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from finetune.data.images import load_training_image
from finetune.data.records import DataError, Example, OnError
from paligemma.tokens import IMAGE_TOKEN

log = logging.getLogger(__name__)


class ExampleDataset(Dataset[dict[str, Any]]):
    """Examples whose images are decoded when an item is read and never kept, so memory does not grow with
    the dataset (:mod:`finetune.data.images`). With ``processor``, each image is also resized to the processor's
    input size there (in the DataLoader's workers when there are any), with its own resize.

    An image that fails to decode (a truncated JPEG passes the loaders' header check): with
    ``on_error="skip"`` it is logged once per file and process and the next example in order takes its
    place (deterministic: ``index + 1``, wrapping); with ``"fail"`` a :class:`DataError` names the file.
    """

    def __init__(self, examples: Sequence[Example], processor: Any = None, on_error: OnError = "skip") -> None:
        self.examples = list(examples)
        self.image_processor = getattr(processor, "image_processor", None)
        self.on_error = on_error
        self._bad: dict[str, str] = {}
        """Files that failed in this process: skipped without being read again."""

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.examples)
        if not -n <= index < n:
            raise IndexError(f"example {index} of {n}")
        for step in range(n):
            ex = self.examples[(index + step) % n]
            if str(ex.image) in self._bad:
                continue
            try:
                image = load_training_image(ex.image, self.image_processor)
            except DataError as exc:
                if self.on_error == "fail":
                    raise
                self._bad[str(ex.image)] = str(exc)
                log.warning("skipping bad image %s", exc)
                continue
            return {"image": image, "prefix": ex.prefix, "suffix": ex.suffix}
        raise DataError(f"no readable image among the {n} examples: {next(iter(self._bad.values()), '')}")


def sequence_lengths(processor: Any, examples: Sequence[Example]) -> tuple[int, int]:
    """``(longest prompt, longest example)`` in tokens, as the collator builds them: the checkpoint's image
    tokens + ``<bos>`` + prefix + ``"\\n"``, then answer + ``<eos>``. Read before training, so a length
    limit that cannot hold the image tokens is refused up front instead of failing inside the tokenizer."""
    tokenizer = processor.tokenizer
    image_tokens = int(processor.image_seq_length)
    prompts = sorted({ex.prefix for ex in examples})
    prompt_lengths = dict(zip(prompts, _token_counts(tokenizer, [p + "\n" for p in prompts]), strict=True))
    answers = _token_counts(tokenizer, [ex.suffix + tokenizer.eos_token for ex in examples])
    longest_prompt = image_tokens + 1 + max(prompt_lengths.values(), default=0)
    longest = max((prompt_lengths[ex.prefix] + n for ex, n in zip(examples, answers, strict=True)), default=0)
    return longest_prompt, image_tokens + 1 + longest


def _token_counts(tokenizer: Any, texts: list[str]) -> list[int]:
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []


@dataclass
class PaliGemmaCollator:
    """``list[{"image", "prefix", "suffix"}]`` -> model inputs with ``labels`` (loss on suffix + eos only)."""

    processor: Any
    max_length: int | None = None
    """Cut longer examples' answers to this many tokens in all (None: never cut; see :func:`sequence_lengths`)."""
    dtype: torch.dtype | None = None
    """Cast ``pixel_values`` to this dtype (bf16 training)."""
    trim_logits: bool = True
    """Add ``logits_to_keep`` and cut ``labels`` to it (module docstring)."""

    def __call__(self, batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
        tokenizer = self.processor.tokenizer
        side = tokenizer.padding_side
        tokenizer.padding_side = "right"
        try:
            inputs = self.processor(
                text=[IMAGE_TOKEN + item["prefix"] for item in batch],
                images=[item["image"] for item in batch],
                suffix=[item["suffix"] for item in batch],
                return_tensors="pt",
                padding="longest",
                truncation="only_second" if self.max_length is not None else False,
                max_length=self.max_length,
            )
        finally:
            tokenizer.padding_side = side
        labels = inputs["labels"].clone()
        labels[inputs["attention_mask"] == 0] = -100
        out = {k: v for k, v in inputs.items() if k != "labels"}
        out["labels"] = labels
        labelled = (labels != -100).any(dim=0).nonzero()
        if self.trim_logits and len(labelled):
            keep = labels.shape[1] - int(labelled[0]) + 1  # from the position that predicts the first label
            out["logits_to_keep"] = keep
            out["labels"] = labels[:, -keep:]
        if self.dtype is not None:
            out["pixel_values"] = out["pixel_values"].to(self.dtype)
        return out
