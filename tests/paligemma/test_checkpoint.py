"""The tiny checkpoint: hub key layout, tokenizer contents, transformers forward, token-id parsing."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from paligemma import SpecialIds, encode_box, parse_detection_token_ids, parse_detections


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoProcessor, PaliGemmaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    model = PaliGemmaForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    return processor, model


def test_files_and_hub_key_layout(tiny_checkpoint: Path) -> None:
    names = {p.name for p in tiny_checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= names
    with safe_open(str(tiny_checkpoint / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("vision_tower.vision_model.embeddings.") for k in keys)
    assert any(k.startswith("language_model.model.layers.") for k in keys)
    assert "multi_modal_projector.linear.weight" in keys
    assert not any(k.startswith(("vision_tower.embeddings", "model.")) for k in keys)
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["architectures"] == ["PaliGemmaForConditionalGeneration"]
    assert config["text_config"]["head_dim"] == 64
    assert config["vision_config"]["vision_use_head"] is False


def test_tokenizer_has_the_paligemma_tokens(loaded) -> None:  # type: ignore[no-untyped-def]
    processor, model = loaded
    tok = processor.tokenizer
    special = SpecialIds.from_tokenizer(tok)
    assert special.seg_start == special.loc_start + 1024
    assert tok.convert_tokens_to_ids("<image>") == special.seg_start + 128 == model.config.image_token_index
    assert tok.encode("\n", add_special_tokens=False)  # vLLM looks up the newline id
    assert tok.tokenize("<loc0007><seg042>") == ["<loc0007>", "<seg042>"]
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)


def test_forward_and_generate_with_the_processor(loaded) -> None:  # type: ignore[no-untyped-def]
    processor, model = loaded
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 160, 3), dtype=np.uint8))
    target = encode_box(10, 20, 80, 60, width=160, height=90) + " red circle"
    batch = processor(images=image, text="<image>detect red circle", suffix=target, return_tensors="pt")
    n_image = processor.image_seq_length
    assert batch["input_ids"][0, :n_image].eq(model.config.image_token_index).all()
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape[-1] == model.config.text_config.vocab_size
    assert torch.isfinite(out.loss)
    prompt = processor(images=image, text="<image>detect red circle", return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 5


def test_parse_from_token_ids_matches_text_and_scores(loaded) -> None:  # type: ignore[no-untyped-def]
    processor, _ = loaded
    tok = processor.tokenizer
    text = encode_box(10, 20, 80, 60, 160, 90) + " red circle ; " + encode_box(0, 0, 40, 40, 160, 90) + " blue"
    ids = tok.encode(text + "<eos>", add_special_tokens=False)
    special = SpecialIds.from_tokenizer(tok)
    logprobs = [-0.1] * len(ids)
    got = parse_detection_token_ids(ids, 160, 90, special=special, decode=tok.decode, logprobs=logprobs)
    want = parse_detections(text, 160, 90)
    assert [(d.label, d.box) for d in got] == [(d.label, d.box) for d in want]
    assert [d.label for d in got] == ["red circle", "blue"]
    assert got[0].score == pytest.approx(np.exp(-0.1))
    positions = got[0].token_positions
    assert [tok.decode([ids[p]]).strip() for p in positions] == [f"<loc{i:04d}>" for i in got[0].loc_tokens] + [
        "red",
        "circle",
    ]


def test_sinusoid_locs_start_neighbouring_bins_close(tmp_path: Path) -> None:
    import torch
    from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor

    from paligemma.checkpoint import TinyConfig, build_tiny_checkpoint
    from paligemma.tokens import LOC_TOKENS

    path = build_tiny_checkpoint(tmp_path, seed=0, cfg=TinyConfig(sinusoid_locs=True))
    model = PaliGemmaForConditionalGeneration.from_pretrained(path)  # the rows survive save and load
    ids = PaliGemmaProcessor.from_pretrained(path).tokenizer.convert_tokens_to_ids(list(LOC_TOKENS))
    rows = model.get_input_embeddings().weight[ids].detach()
    similarity = torch.nn.functional.cosine_similarity(rows[500:501], rows, dim=1)
    assert similarity[500] == pytest.approx(1.0)
    assert similarity[501] > 0.95 > similarity[510] > similarity[550] > similarity[1000]
    other = model.get_input_embeddings().weight[: ids[0]].detach().norm(dim=1)[1:]  # row 0 is <pad>'s zeros
    assert float(rows.norm(dim=1).mean()) == pytest.approx(float(other.mean()), rel=0.02)  # the init's scale


def test_save_checkpoint_shards_above_the_size_and_leaves_no_stale_files(
    loaded,  # type: ignore[no-untyped-def]
    tiny_checkpoint: Path,
    tmp_path: Path,
) -> None:
    from transformers import PaliGemmaForConditionalGeneration

    from paligemma.checkpoint import save_checkpoint
    from paligemma.shards import INDEX_FILE, checkpoint_files, iter_checkpoint_tensors, read_header

    processor, _ = loaded
    model = PaliGemmaForConditionalGeneration.from_pretrained(tiny_checkpoint)  # save_checkpoint sets its dtype
    single = save_checkpoint(model, processor, tmp_path / "single")
    out = save_checkpoint(model, processor, tmp_path / "out", dtype=torch.bfloat16)  # single first: stale later
    assert [p.name for p in checkpoint_files(out)] == ["model.safetensors"]
    save_checkpoint(model, processor, out, dtype=torch.float32, max_shard_bytes=1 << 20)  # sharded over single
    files = checkpoint_files(out)
    assert len(files) >= 3 and [p.name for p in files] == [
        f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)
    ]
    assert sorted(p.name for p in out.glob("model*")) == sorted([*(p.name for p in files), INDEX_FILE])
    index = json.loads((out / INDEX_FILE).read_text())
    tensors = dict(iter_checkpoint_tensors(out))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert set(index["weight_map"]) == set(tensors) and set(index["weight_map"].values()) == {p.name for p in files}
    assert all(read_header(p)["__metadata__"] == {"format": "pt"} for p in files)
    for path in files:  # the files safetensors itself reads, under the index's names
        with safe_open(str(path), "pt") as f:
            assert {index["weight_map"][k] for k in f.keys()} == {path.name}  # noqa: SIM118 - not a dict

    sharded, info = PaliGemmaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    reference = PaliGemmaForConditionalGeneration.from_pretrained(single)
    for (name, a), (_, b) in zip(sharded.state_dict().items(), reference.state_dict().items(), strict=True):
        assert a.dtype == torch.float32 and torch.equal(a, b), name

    save_checkpoint(model, processor, out)  # and back to a single file
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
    assert not list(out.glob(".shard-*"))
