"""Random-weight checkpoints with the released architectures (``python -m finetune random-like``).

Parameter counts of every architecture against the meta-device model and the published figures; shallow
real-width, real-vocabulary builds through the CLI that transformers loads with no missing key, with the real
token ids and 256 image tokens; the builder's peak memory against the size it writes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from paligemma import SpecialIds
from paligemma.random_like import fill_normal, hub_shapes, init_kind, meta_model, random_like_config
from paligemma.variants import ARCHITECTURES, IMAGE_TOKEN_INDEX, VOCAB_SIZE, get_variant

REPO = Path(__file__).resolve().parents[2]

# Published parameter counts, in billions: the PaliGemma / PaliGemma 2 model cards ("3B", "10B", "28B") and
# KerasHub's presets (which count 64 fewer embedding rows: 257,152 instead of the padded 257,216).
EXPECTED_BILLIONS = {
    "paligemma-3b": 2.92,
    "paligemma2-3b": 3.03,
    "paligemma2-10b": 9.66,
    "paligemma2-28b": 27.65,
}
KERAS_PRESET_PARAMS = {  # keras_hub pali_gemma_presets.py; 28B 448/896 there repeat the 224 figure
    "paligemma-3b-224": 2_923_335_408,
    "paligemma-3b-448": 2_924_220_144,
    "paligemma-3b-896": 2_927_759_088,
    "paligemma2-3b-224": 3_032_094_960,
    "paligemma2-3b-448": 3_032_979_696,
    "paligemma2-3b-896": 3_036_518_640,
    "paligemma2-10b-224": 9_662_409_456,
    "paligemma2-10b-448": 9_663_294_192,
    "paligemma2-10b-896": 9_666_833_136,
    "paligemma2-28b-224": 27_650_192_112,
}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_parameter_count_of_every_architecture(arch: str) -> None:
    variant = get_variant(arch)
    model = meta_model(random_like_config(variant))
    counted = sum(p.numel() for p in model.parameters())  # the tied lm_head is the embedding: counted once
    assert counted == variant.parameter_count()
    assert counted == pytest.approx(EXPECTED_BILLIONS[arch.rsplit("-", 1)[0]] * 1e9, rel=0.01)
    if arch in KERAS_PRESET_PARAMS:
        assert counted - KERAS_PRESET_PARAMS[arch] == 64 * variant.decoder.hidden
    shapes = dict(hub_shapes(random_like_config(variant, layers=1, vision_layers=1)))
    assert shapes["language_model.model.embed_tokens.weight"] == (VOCAB_SIZE, variant.decoder.hidden)
    assert shapes["vision_tower.vision_model.embeddings.position_embedding.weight"] == (
        variant.image_seq_length,
        1152,
    )
    assert not any(name.startswith(("model.", "lm_head", "language_model.lm_head")) for name in shapes)


def test_config_is_the_released_one() -> None:
    config = random_like_config(get_variant("paligemma2-28b-896"), dtype="bfloat16")
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (
        4608,
        46,
        32,
        16,
    )
    assert (text.head_dim, text.intermediate_size, text.query_pre_attn_scalar) == (128, 36864, 144)
    assert (text.attn_logit_softcapping, text.final_logit_softcapping, text.sliding_window) == (50.0, 30.0, 4096)
    assert text.layer_types[:2] == ["sliding_attention", "full_attention"]
    assert (vision.hidden_size, vision.num_hidden_layers, vision.image_size, vision.vision_use_head) == (
        1152,
        27,
        896,
        False,
    )
    assert config.image_token_index == IMAGE_TOKEN_INDEX == 257152
    assert text.vocab_size == 257216 and config.tie_word_embeddings
    pg1 = random_like_config(get_variant("paligemma-3b-224"), layers=2).text_config
    assert (pg1.model_type, pg1.num_hidden_layers, pg1.num_key_value_heads, pg1.hidden_activation) == (
        "gemma",
        2,
        1,
        "gelu_pytorch_tanh",
    )


def test_init_kinds_and_deterministic_values() -> None:
    assert init_kind("language_model.model.layers.0.input_layernorm.weight", 1) == "zeros"
    assert init_kind("language_model.model.norm.weight", 1) == "zeros"
    assert init_kind("vision_tower.vision_model.post_layernorm.weight", 1) == "ones"
    assert init_kind("vision_tower.vision_model.encoder.layers.0.layer_norm1.bias", 1) == "zeros"
    assert init_kind("multi_modal_projector.linear.bias", 1) == "zeros"
    assert init_kind("vision_tower.vision_model.embeddings.patch_embedding.weight", 4) == "normal"

    def filled(name: str, seed: int, threads: int) -> torch.Tensor:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            out = torch.empty(3_000_000 * 3, dtype=torch.bfloat16)  # a few chunks
            fill_normal(out, name, seed)
            return out
        finally:
            torch.set_num_threads(before)

    a = filled("x.weight", 0, 1)
    assert torch.equal(a, filled("x.weight", 0, 2))  # independent of the thread count
    assert not torch.equal(a, filled("x.weight", 1, 2))
    assert not torch.equal(a, filled("y.weight", 0, 2))
    assert a.float().std().item() == pytest.approx(0.02, rel=0.01)


def test_help_lists_the_architectures(capsys: pytest.CaptureFixture[str]) -> None:
    from finetune.__main__ import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["random-like", "--help"])
    help_text = capsys.readouterr().out
    for arch in ARCHITECTURES:
        assert arch in help_text
    assert "3.03 B params" in help_text and "27.65 B params" in help_text


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Where the 1.4-2.4 GB checkpoints go: RAM (/dev/shm) where it has room, so the tests time the builder
    and not the disk's write-back; removed after the module."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 8 * 2**30:
        path = Path(tempfile.mkdtemp(prefix="random-like-", dir=shm))
        yield path
        shutil.rmtree(path, ignore_errors=True)
    else:
        yield tmp_path_factory.mktemp("random-like")


@pytest.fixture(scope="module")
def shallow(scratch: Path) -> Iterator[dict[str, Path]]:
    """One text block and one SigLIP block at real width and vocabulary, PaliGemma 1 and 2, via the CLI."""
    from finetune.__main__ import main

    out = {}
    for arch in ("paligemma2-3b-224", "paligemma-3b-224"):
        path = scratch / arch
        main(["random-like", arch, "--out", str(path), "--layers", "1", "--vision-layers", "1"])
        out[arch] = path
    yield out
    for path in out.values():
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("arch", ["paligemma2-3b-224", "paligemma-3b-224"])
def test_shallow_checkpoint_loads_with_the_real_vocabulary(shallow: dict[str, Path], arch: str) -> None:
    from transformers import AutoProcessor, AutoTokenizer, PaliGemmaForConditionalGeneration

    path = shallow[arch]
    variant = get_variant(arch)
    assert json.loads((path / "random_like.json").read_text())["layers"] == 1
    model, info = PaliGemmaForConditionalGeneration.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.bfloat16
    assert sum(p.numel() for p in model.parameters()) == variant.parameter_count(1, 1)
    config = json.loads((path / "config.json").read_text())
    assert config["text_config"]["hidden_size"] == variant.decoder.hidden
    assert config["text_config"]["num_hidden_layers"] == 1 and config["dtype"] == "bfloat16"
    embedding = model.get_input_embeddings().weight
    assert embedding.shape == (257216, variant.decoder.hidden)
    assert embedding[:4096].float().std().item() == pytest.approx(0.02, rel=0.05)  # a sample: no fp32 copy
    assert model.model.language_model.norm.weight.eq(0).all()  # Gemma RMSNorm: x * (1 + w)

    processor = AutoProcessor.from_pretrained(path)
    tok = processor.tokenizer
    assert len(tok) == 257153
    ids = tok.convert_tokens_to_ids(["<pad>", "<eos>", "<bos>", "\n", "<loc0000>", "<loc1023>", "<seg000>"])
    assert ids == [0, 1, 2, 108, 256000, 257023, 257024]
    assert tok.convert_tokens_to_ids(["<seg127>", "<image>"]) == [257151, 257152]
    assert tok.convert_tokens_to_ids("<image>") == model.config.image_token_index
    assert SpecialIds.from_tokenizer(tok) == SpecialIds(loc_start=256000, seg_start=257024)
    assert tok.tokenize("<loc0007><seg042>") == ["<loc0007>", "<seg042>"]
    # the released tokenizers: PaliGemma 1 adds <bos> itself, PaliGemma 2 does not (the processor turns the
    # tokenizer's own <bos> off and writes it itself, so read the tokenizer alone)
    alone = AutoTokenizer.from_pretrained(path)
    assert (alone.encode("detect cat")[0] == 2) == (variant.generation == 1)

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 160, 3), dtype=np.uint8))
    batch = processor(text="<image>detect cat", images=image, return_tensors="pt")
    input_ids = batch["input_ids"][0].tolist()
    assert processor.image_seq_length == 256
    assert input_ids[:256] == [257152] * 256
    assert input_ids[256] == 2 and input_ids[-1] == 108  # <bos> after the image, "\n" ends the prefix
    assert tok.decode(input_ids[257:-1]) == "detect cat"
    assert batch["pixel_values"].shape == (1, 3, 224, 224)


def test_peak_memory_stays_far_below_the_model(scratch: Path) -> None:
    """Build in a subprocess and compare its peak RSS growth with what it writes.

    The random fill is swapped for zeros here: the memory path (one tensor materialised in the output dtype,
    the writer holding one shard) is the same, and 2 GB of normal samples would cost this test 20 s."""
    out = scratch / "memory"
    script = textwrap.dedent(
        f"""
        import json, resource
        import torch, transformers
        import paligemma.random_like as rl
        from paligemma.checkpoint import build_tokenizer
        build_tokenizer(256000)  # warm the tokenizer path
        rl.fill_normal = lambda out, name, seed, std=0.02: out.zero_()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rl.build_random_like("paligemma-3b-224", {str(out)!r}, layers=6, vision_layers=1,
                             max_shard_bytes=128 * 2**20, progress=False)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"growth": (after - before) * 1024}}))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    growth = json.loads(result.stdout.strip().splitlines()[-1])["growth"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    written = index["metadata"]["total_size"]
    embedding = 257216 * 2048 * 2  # the largest tensor, which must be whole in memory once
    assert len(set(index["weight_map"].values())) > 5  # sharded
    assert written > 2.2e9
    assert growth < embedding + 128 * 2**20 + 400 * 2**20, (growth, written)
    assert growth < 0.6 * written, (growth, written)
    shutil.rmtree(out, ignore_errors=True)
