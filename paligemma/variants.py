"""The released PaliGemma architectures: PaliGemma 1 (3B) and PaliGemma 2 (3B, 10B, 28B) at 224, 448 and 896 px.

Sizes from transformers' ``convert_paligemma_weights_to_hf.py`` / ``convert_paligemma2_weights_to_hf.py``
(``VARIANT_CONFIGS``) and the released ``config.json`` files (``shared/notes/paligemma-format.md`` §10). Every
variant has the SigLIP So400m/14 vision tower without its pooling head, a linear projector to the decoder's
width, and the 257,216-row (padded) embedding of the 257,152-token vocabulary tied to the output head.

:meth:`Variant.config_dict` gives the arguments of transformers' ``PaliGemmaConfig``;
:meth:`Variant.parameter_count` counts parameters without torch (for ``--help``).
Pure Python: importing this module stays light.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from paligemma.tokens import NUM_LOC_TOKENS, NUM_SEG_TOKENS

BASE_VOCAB_SIZE = 256_000
"""Gemma's SentencePiece pieces (ids 0..255999)."""
LOC_START = BASE_VOCAB_SIZE
SEG_START = LOC_START + NUM_LOC_TOKENS
IMAGE_TOKEN_INDEX = SEG_START + NUM_SEG_TOKENS
"""``<image>`` = 257152: the first id after ``<loc>`` and ``<seg>``."""
VOCAB_SIZE = -(-(IMAGE_TOKEN_INDEX + 1) // 64) * 64
"""Embedding rows: 257,153 tokens padded to a multiple of 64 = 257,216."""
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2
NEWLINE_ID = 108
"""``"\\n"`` in Gemma's vocabulary."""
PATCH_SIZE = 14
SLIDING_WINDOW = 4096
MAX_POSITION_EMBEDDINGS = 8192


@dataclass(frozen=True)
class Decoder:
    """A Gemma (PaliGemma 1) or Gemma 2 (PaliGemma 2) decoder."""

    name: str
    model_type: Literal["gemma", "gemma2"]
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    query_pre_attn_scalar: int | None = None
    """Gemma 2 only: the attention scale is ``query_pre_attn_scalar ** -0.5`` (144 = 4608 / 32 for 27B)."""


@dataclass(frozen=True)
class VisionTower:
    """SigLIP vision encoder (no pooling head)."""

    name: str = "SigLIP So400m/14"
    hidden: int = 1152
    layers: int = 27
    heads: int = 16
    intermediate: int = 4304
    patch_size: int = PATCH_SIZE


GEMMA_2B = Decoder("Gemma 2B", "gemma", 2048, 18, 8, 1, 256, 16384)
GEMMA2_2B = Decoder("Gemma 2 2B", "gemma2", 2304, 26, 8, 4, 256, 9216, 256)
GEMMA2_9B = Decoder("Gemma 2 9B", "gemma2", 3584, 42, 16, 8, 256, 14336, 256)
GEMMA2_27B = Decoder("Gemma 2 27B", "gemma2", 4608, 46, 32, 16, 128, 36864, 4608 // 32)
SIGLIP_SO400M = VisionTower()


@dataclass(frozen=True)
class Variant:
    """One released PaliGemma architecture, e.g. ``paligemma2-3b-224``."""

    name: str
    generation: Literal[1, 2]
    size: str
    """Marketing size: ``3b``, ``10b``, ``28b``."""
    image_size: int
    decoder: Decoder
    vision: VisionTower = SIGLIP_SO400M

    @property
    def image_seq_length(self) -> int:
        """Image tokens: ``(image_size / 14)²`` = 256, 1,024 or 4,096."""
        return (self.image_size // self.vision.patch_size) ** 2

    @property
    def add_bos_token(self) -> bool:
        """The released tokenizers: PaliGemma 1's adds ``<bos>`` itself, PaliGemma 2's does not."""
        return self.generation == 1

    def _layers(self, layers: int | None, vision_layers: int | None) -> tuple[int, int]:
        text = self.decoder.layers if layers is None else layers
        vision = self.vision.layers if vision_layers is None else vision_layers
        if text < 1 or vision < 1:
            raise ValueError(f"layers must be at least 1, got text {text} and vision {vision}")
        return text, vision

    def config_dict(
        self, layers: int | None = None, vision_layers: int | None = None, dtype: str = "bfloat16"
    ) -> dict[str, Any]:
        """Keyword arguments of transformers' ``PaliGemmaConfig``, as in the released ``config.json``.

        ``layers`` / ``vision_layers`` replace the decoder's / SigLIP's block count (widths, vocabulary and
        everything else stay real)."""
        text_layers, n_vision = self._layers(layers, vision_layers)
        d = self.decoder
        text: dict[str, Any] = {
            "model_type": d.model_type,
            "vocab_size": VOCAB_SIZE,
            "hidden_size": d.hidden,
            "num_hidden_layers": text_layers,
            "num_attention_heads": d.heads,
            "num_key_value_heads": d.kv_heads,
            "head_dim": d.head_dim,
            "intermediate_size": d.intermediate,
            "hidden_activation": "gelu_pytorch_tanh",
            "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "attention_bias": False,
            "pad_token_id": PAD_ID,
            "eos_token_id": EOS_ID,
            "bos_token_id": BOS_ID,
            "tie_word_embeddings": True,
            "dtype": dtype,
        }
        if d.model_type == "gemma2":
            text |= {
                "query_pre_attn_scalar": d.query_pre_attn_scalar,
                "attn_logit_softcapping": 50.0,
                "final_logit_softcapping": 30.0,
                "sliding_window": SLIDING_WINDOW,
                # Gemma 2: layer 0 is local (sliding), then they alternate.
                "layer_types": [("sliding_attention", "full_attention")[i % 2] for i in range(text_layers)],
            }
        v = self.vision
        return {
            "text_config": text,
            "vision_config": {
                "model_type": "siglip_vision_model",
                "hidden_size": v.hidden,
                "intermediate_size": v.intermediate,
                "num_hidden_layers": n_vision,
                "num_attention_heads": v.heads,
                "image_size": self.image_size,
                "patch_size": v.patch_size,
                "hidden_act": "gelu_pytorch_tanh",
                "layer_norm_eps": 1e-6,
                "vision_use_head": False,
                "dtype": dtype,
            },
            "image_token_index": IMAGE_TOKEN_INDEX,
            "projection_dim": d.hidden,
            "pad_token_id": PAD_ID,
            "bos_token_id": BOS_ID,
            "eos_token_id": EOS_ID,
            "tie_word_embeddings": True,
            "dtype": dtype,
        }

    def parameter_count(self, layers: int | None = None, vision_layers: int | None = None) -> int:
        """Parameters of ``PaliGemmaForConditionalGeneration`` (tied output head counted once)."""
        text_layers, n_vision = self._layers(layers, vision_layers)
        v, d = self.vision, self.decoder
        patches = self.image_seq_length
        vision = 3 * v.patch_size**2 * v.hidden + v.hidden + patches * v.hidden  # patch conv + positions
        vision_block = 4 * (v.hidden * v.hidden + v.hidden) + 2 * v.hidden * v.intermediate
        vision_block += v.intermediate + v.hidden + 4 * v.hidden  # fc biases, two LayerNorms
        vision += n_vision * vision_block + 2 * v.hidden  # post_layernorm
        projector = v.hidden * d.hidden + d.hidden
        attention = 2 * d.hidden * d.heads * d.head_dim + 2 * d.hidden * d.kv_heads * d.head_dim
        norms = (2 if d.model_type == "gemma" else 4) * d.hidden
        text_block = attention + 3 * d.hidden * d.intermediate + norms
        text = VOCAB_SIZE * d.hidden + text_layers * text_block + d.hidden  # embedding, blocks, final norm
        return vision + projector + text


def _variants() -> dict[str, Variant]:
    out: dict[str, Variant] = {}
    for size in (224, 448, 896):
        out[f"paligemma-3b-{size}"] = Variant(f"paligemma-3b-{size}", 1, "3b", size, GEMMA_2B)
    for label, decoder in (("3b", GEMMA2_2B), ("10b", GEMMA2_9B), ("28b", GEMMA2_27B)):
        for size in (224, 448, 896):
            out[f"paligemma2-{label}-{size}"] = Variant(f"paligemma2-{label}-{size}", 2, label, size, decoder)
    return out


ARCHITECTURES: dict[str, Variant] = _variants()
"""Every released architecture by name: ``paligemma-3b-{224,448,896}``, ``paligemma2-{3b,10b,28b}-{224,448,896}``."""


def get_variant(name: str) -> Variant:
    """The architecture called ``name``; a ValueError lists the known ones."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}") from None


def describe(variant: Variant) -> str:
    """One line for ``--help``: name, parameters, decoder, vision, image tokens."""
    billions = variant.parameter_count() / 1e9
    return (
        f"{variant.name}: {billions:.2f} B params, {variant.decoder.name} "
        f"({variant.decoder.hidden}x{variant.decoder.layers}) + {variant.vision.name} "
        f"({variant.vision.hidden}x{variant.vision.layers}), {variant.image_seq_length} image tokens"
    )
