"""Collator masking: labels are -100 on image + prefix and padding, real ids on suffix + eos."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor

from finetune.data.collate import PaliGemmaCollator


def test_labels_mask_image_prefix_and_padding(tiny_checkpoint: Path) -> None:
    processor = PaliGemmaProcessor.from_pretrained(tiny_checkpoint)
    tok = processor.tokenizer
    image = Image.new("RGB", (112, 112), (40, 40, 40))
    batch = PaliGemmaCollator(processor, max_length=128, trim_logits=False)(
        [
            {
                "image": image,
                "prefix": "detect circle ; square",
                "suffix": "<loc0010><loc0020><loc0300><loc0400> circle",
            },
            {"image": image, "prefix": "answer en how many shapes are there?", "suffix": ""},
        ]
    )
    ids, labels, types, mask = batch["input_ids"], batch["labels"], batch["token_type_ids"], batch["attention_mask"]
    assert batch["pixel_values"].shape == (2, 3, 112, 112)
    for row in range(2):
        real = mask[row] == 1
        suffix = real & (types[row] == 1)
        assert (labels[row][~suffix] == -100).all()  # image, bos, prefix, "\n" and padding
        assert (labels[row][suffix] == ids[row][suffix]).all()
        assert ids[row][suffix][-1].item() == tok.eos_token_id  # the target ends with eos
        assert ids[row][real][:64].eq(tok.convert_tokens_to_ids("<image>")).all()
        assert not real[: int(real.sum())].logical_not().any()  # right padding: real tokens first
    first_suffix = tok.convert_ids_to_tokens(ids[0][types[0] == 1].tolist())
    assert first_suffix[:4] == ["<loc0010>", "<loc0020>", "<loc0300>", "<loc0400>"]
    empty = ids[1][(types[1] == 1) & (mask[1] == 1)].tolist()
    assert empty == [tok.eos_token_id]  # an empty target: the suffix is just eos
    assert (mask[1] == 0).any() and (labels[1][mask[1] == 0] == -100).all()


def test_trimmed_logits_give_the_same_loss(tiny_checkpoint: Path) -> None:
    """``logits_to_keep`` + cut labels: the head skips image and prompt positions, the loss is unchanged."""
    processor = PaliGemmaProcessor.from_pretrained(tiny_checkpoint)
    model = PaliGemmaForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    boxes = "<loc0010><loc0020><loc0300><loc0400> circle ; <loc0500><loc0020><loc0900><loc0400> square"
    items = [
        {"image": Image.new("RGB", (112, 112), (200, 30, 30)), "prefix": "detect circle ; square", "suffix": boxes},
        {
            "image": Image.new("RGB", (112, 112), (30, 30, 200)),
            "prefix": "answer en what color is it?",
            "suffix": "blue",
        },
    ]
    full = PaliGemmaCollator(processor, trim_logits=False)(items)
    trimmed = PaliGemmaCollator(processor)(items)
    keep = trimmed["logits_to_keep"]
    first_label = int((full["labels"] != -100).any(dim=0).nonzero()[0])
    assert keep == full["input_ids"].shape[1] - first_label + 1 < full["input_ids"].shape[1] - 64
    assert torch.equal(trimmed["labels"], full["labels"][:, -keep:])
    with torch.no_grad():
        out_full, out_trimmed = model(**full), model(**trimmed)
    assert out_trimmed.logits.shape[1] == keep
    assert torch.allclose(out_trimmed.loss, out_full.loss, atol=1e-6), (out_trimmed.loss, out_full.loss)


def test_sequence_lengths_are_the_collators_own(tiny_checkpoint: Path) -> None:
    """What ``train`` checks ``--max-length`` against is exactly what the collator builds, per example."""
    from finetune.data.collate import sequence_lengths
    from finetune.data.records import Example

    processor = PaliGemmaProcessor.from_pretrained(tiny_checkpoint)
    image = Image.new("RGB", (112, 112), (40, 40, 40))
    examples = [
        Example(Path("x.png"), "detect circle ; square", "<loc0010><loc0020><loc0300><loc0400> circle"),
        Example(image=Path("x.png"), prefix="answer en how many shapes are there in this picture?", suffix="two"),
        Example(image=Path("x.png"), prefix="caption en", suffix="a red circle above a blue square on grey"),
    ]
    collate = PaliGemmaCollator(processor, trim_logits=False)
    built = [collate([{"image": image, "prefix": e.prefix, "suffix": e.suffix}]) for e in examples]
    prompts = [int((b["token_type_ids"][0] == 0).sum()) for b in built]
    totals = [int(b["attention_mask"][0].sum()) for b in built]
    assert sequence_lengths(processor, examples) == (max(prompts), max(totals))
    assert sequence_lengths(processor, examples[:1]) == (prompts[0], totals[0])
