"""Collator masking: labels are -100 on image + prefix and padding, real ids on suffix + eos."""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from transformers import PaliGemmaProcessor

from finetune.collate import PaliGemmaCollator


def test_labels_mask_image_prefix_and_padding(tiny_checkpoint: Path) -> None:
    processor = PaliGemmaProcessor.from_pretrained(tiny_checkpoint)
    tok = processor.tokenizer
    image = Image.new("RGB", (112, 112), (40, 40, 40))
    batch = PaliGemmaCollator(processor, max_length=128)(
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
