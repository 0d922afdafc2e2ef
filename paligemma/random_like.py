"""Random-weight checkpoints with a released PaliGemma architecture, written one tensor at a time.

:func:`build_random_like` writes what a hub checkpoint holds (``config.json``, ``generation_config.json``,
hub-layout safetensors, sharded above ``max_shard_bytes`` with ``model.safetensors.index.json``, tokenizer
and processor files) for any architecture in :data:`paligemma.variants.ARCHITECTURES`, with random weights:
nothing is downloaded. Real sizes make real costs measurable (memory, load time, KV cache, image tokens) on
machines that cannot fetch Google's weights; greedy output of random weights is degenerate, by design.

The tensor names and shapes come from transformers' ``PaliGemmaForConditionalGeneration`` built on the
``meta`` device (no memory), renamed to the hub layout by :func:`paligemma.checkpoint.hub_tensors`. Each
tensor is generated on its own, directly in the output dtype, and handed to
:class:`paligemma.shards.ShardedWriter`: the process holds at most the largest tensor (the embedding) plus one
shard, never the model.

Weights: normal(0, 0.02) for matrices, embeddings and the patch convolution; zeros for Gemma's RMSNorm
weights (Gemma computes ``x * (1 + w)``); ones / zeros for SigLIP's LayerNorm weight / bias; zeros for every
bias. Values are a pure function of (seed, tensor name): a shallow build's first blocks equal a full build's.

The tokenizer is the project's tiny Gemma-style BPE padded to Gemma's 256,000 pieces
(:func:`paligemma.checkpoint.build_tokenizer`), so every special id is the real one: pad 0, eos 1, bos 2,
``"\\n"`` 108, ``<loc0000>`` 256000, ``<seg000>`` 257024, ``<image>`` 257152.

torch and transformers are imported inside the functions so importing ``paligemma`` stays light.
"""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from paligemma.shards import DEFAULT_SHARD_BYTES, ShardedWriter
from paligemma.variants import BASE_VOCAB_SIZE, BOS_ID, EOS_ID, PAD_ID, Variant, get_variant

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

INIT_STD = 0.02
"""Std of the random matrices (transformers' ``initializer_range`` for Gemma and SigLIP)."""
DTYPES = ("bfloat16", "float16", "float32")
CHUNK_ELEMENTS = 1 << 22
"""Elements generated per step (16 MiB of float32): each chunk has its own generator, so chunks fill in
parallel threads and the result does not depend on the thread count."""
MANIFEST = "random_like.json"


def tensor_seed(seed: int, name: str, chunk: int = 0) -> int:
    """Seed of one chunk of one tensor: a hash of (seed, name, chunk), stable across runs and machines."""
    digest = hashlib.sha256(f"{seed}/{name}/{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def fill_normal(out: torch.Tensor, name: str, seed: int, std: float = INIT_STD) -> None:
    """Fill ``out`` (any float dtype, contiguous) with normal(0, ``std``) in float32 chunks of
    :data:`CHUNK_ELEMENTS`, each from its own seeded ``torch.Generator``, across the CPU threads."""
    import torch

    flat = out.view(-1)
    total = flat.numel()

    def fill(chunk: int) -> None:
        start = chunk * CHUNK_ELEMENTS
        stop = min(total, start + CHUNK_ELEMENTS)
        generator = torch.Generator().manual_seed(tensor_seed(seed, name, chunk))
        values = torch.empty(stop - start, dtype=torch.float32).normal_(0.0, std, generator=generator)
        flat[start:stop].copy_(values)

    chunks = -(-total // CHUNK_ELEMENTS)
    workers = min(chunks, max(1, torch.get_num_threads()))
    if workers <= 1:
        for chunk in range(chunks):
            fill(chunk)
        return
    with ThreadPoolExecutor(workers) as pool:  # torch releases the GIL while it fills
        list(pool.map(fill, range(chunks)))


def init_kind(name: str, ndim: int) -> str:
    """``normal``, ``zeros`` or ``ones`` for a hub-layout tensor name."""
    if ndim >= 2:
        return "normal"  # linear weights, embeddings, patch convolution, position embedding
    if name.endswith(".bias"):
        return "zeros"
    if name.startswith("vision_tower."):
        return "ones"  # SigLIP LayerNorm weights
    return "zeros"  # Gemma RMSNorm weights: x * (1 + w)


def make_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """One tensor of the checkpoint, generated in ``dtype``."""
    import torch

    kind = init_kind(name, len(shape))
    if kind == "zeros":
        return torch.zeros(shape, dtype=dtype)
    if kind == "ones":
        return torch.ones(shape, dtype=dtype)
    out = torch.empty(shape, dtype=dtype)
    fill_normal(out, name, seed)
    return out


def random_like_config(
    variant: Variant, layers: int | None = None, vision_layers: int | None = None, dtype: str = "bfloat16"
) -> Any:
    """transformers ``PaliGemmaConfig`` of ``variant`` (with ``layers`` / ``vision_layers`` blocks)."""
    from transformers import PaliGemmaConfig

    config = PaliGemmaConfig(**variant.config_dict(layers, vision_layers, dtype))
    config.architectures = ["PaliGemmaForConditionalGeneration"]
    return config


def meta_model(config: Any) -> Any:
    """``PaliGemmaForConditionalGeneration(config)`` on the meta device: shapes without memory."""
    import torch
    from transformers import PaliGemmaForConditionalGeneration

    with torch.device("meta"):
        return PaliGemmaForConditionalGeneration(config)


def hub_shapes(config: Any) -> list[tuple[str, tuple[int, ...]]]:
    """``(hub name, shape)`` of every tensor a checkpoint of ``config`` holds (tied ``lm_head`` left out)."""
    from paligemma.checkpoint import hub_tensors

    return [(name, tuple(tensor.shape)) for name, tensor in hub_tensors(meta_model(config))]


def build_random_like(
    arch: str,
    out: str | Path,
    layers: int | None = None,
    vision_layers: int | None = None,
    dtype: str = "bfloat16",
    seed: int = 0,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = True,
) -> Path:
    """Write a random-weight checkpoint of architecture ``arch`` (e.g. ``paligemma2-3b-224``) to ``out``.

    ``layers`` / ``vision_layers`` keep every width and the vocabulary but use that many decoder / SigLIP
    blocks (default: the released counts). ``dtype`` is the weights' and the config's dtype."""
    import torch
    from tqdm import tqdm
    from transformers import GenerationConfig

    from paligemma.checkpoint import build_processor, build_tokenizer

    variant = get_variant(arch)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    torch_dtype = getattr(torch, dtype)
    config = random_like_config(variant, layers, vision_layers, dtype)
    shapes = hub_shapes(config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    total = sum(_numel(shape) for _, shape in shapes) * torch_dtype.itemsize
    log.info("%s: %d tensors, %.2f GiB in %s -> %s", arch, len(shapes), total / 2**30, dtype, out)
    with (
        ShardedWriter(out, max_shard_bytes) as writer,
        tqdm(total=len(shapes), unit="tensor", desc=arch, disable=not progress) as bar,
    ):
        for name, shape in shapes:
            tensor = make_tensor(name, shape, torch_dtype, seed)
            writer.add(name, tensor)
            del tensor  # the writer keeps it until its shard is written, and no longer
            bar.update()
        parameters = writer.total_parameters

    config.save_pretrained(out)
    generation = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)  # type: ignore[no-untyped-call]
    generation.save_pretrained(out)
    tokenizer = build_tokenizer(BASE_VOCAB_SIZE)
    processor = build_processor(tokenizer, variant.image_size, variant.image_seq_length)
    # PaliGemmaProcessor turns the tokenizer's own <bos> off (it writes <bos> itself); the released
    # tokenizers differ (PaliGemma 1 adds it, 2 does not) and vLLM reads the flag to place the image tokens.
    processor.tokenizer.add_bos_token = variant.add_bos_token
    processor.save_pretrained(out)
    manifest = {
        "arch": variant.name,
        "layers": config.text_config.num_hidden_layers,
        "vision_layers": config.vision_config.num_hidden_layers,
        "real_layers": variant.decoder.layers,
        "real_vision_layers": variant.vision.layers,
        "seed": seed,
        "dtype": dtype,
        "parameters": parameters,
        "bytes": total,
        "weights": "random (normal 0.02; Gemma norms 0; LayerNorms 1/0; biases 0), not Google's",
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for side in shape:
        n *= side
    return n
