"""Build and save PaliGemma checkpoints that both transformers and vLLM load.

Two facts drive this module (see ``shared/notes/style.md``):

- vLLM only accepts the hub key layout (``vision_tower.vision_model.*``, ``language_model.model.*``,
  ``multi_modal_projector.*``), but transformers 5 ``save_pretrained`` of a freshly built model, and of a
  peft-merged one, writes ``vision_tower.embeddings.*``. :func:`save_checkpoint` always writes the hub
  layout itself.
- Tests and CI cannot download Google's weights, so :func:`build_tiny_checkpoint` makes a small, randomly
  initialised PaliGemma with a real tokenizer (Gemma-style BPE with byte fallback, ``<image>``, 1024 loc
  and 128 seg tokens, ``"\\n"``) whose shapes vLLM's CPU backend can run (text ``head_dim`` 64).

transformers and torch are imported inside the functions so importing ``paligemma`` stays light.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from paligemma.shards import DEFAULT_SHARD_BYTES, ShardedWriter
from paligemma.tokens import IMAGE_TOKEN, LOC_TOKENS, SEG_TOKENS

if TYPE_CHECKING:
    import torch
    from transformers import GemmaTokenizer, PaliGemmaForConditionalGeneration, PaliGemmaProcessor

# Words the tiny tokenizer learns whole: task prefixes, languages, the synthetic shapes data and common
# question words. Anything else still tokenizes, through byte fallback.
_CORPUS_WORDS = """
caption cap describe ocr answer question detect segment en es fr de it pt ja zh ko ru a an the of in
on at to and or is are was were be there here this that what which where who how many much color
colour shape size left right top bottom middle center centre upper lower above below next one two
three four five six seven eight nine ten zero no yes none circle square triangle rectangle star
ellipse hexagon diamond cross ring red green blue yellow orange purple pink white black gray grey
brown cyan magenta small large big tiny medium background image picture photo object objects shapes
shape cat dog person car bird horse sheep cow bicycle bus truck boat chair table bottle cup tree
house
""".split()  # noqa: SIM905 - a word list reads better as text


@dataclass(frozen=True)
class TinyConfig:
    """Shapes of the tiny model; the defaults are the ones vLLM 0.32's CPU backend ran."""

    image_size: int = 112
    patch_size: int = 14
    vision_hidden: int = 128
    vision_layers: int = 2
    vision_heads: int = 2
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 2
    text_kv_heads: int = 1
    head_dim: int = 64
    intermediate: int = 256
    init_std: float | None = None
    """Std of the random weight matrices; None keeps transformers' 0.02. Around 0.3 makes greedy output
    vary from token to token (at 0.02 a random model repeats ``"\n"``), which parity tests need."""
    text_model: Literal["gemma", "gemma2"] = "gemma"
    """``gemma`` is PaliGemma 1's decoder; ``gemma2`` is PaliGemma 2's: logit soft-capping (attention 50,
    final 30), ``query_pre_attn_scalar``, and alternating sliding-window and global layers."""
    sliding_window: int = 4096
    """Window of the ``gemma2`` sliding layers (the released models use 4,096)."""
    sinusoid_locs: bool = False
    """Start the ``<locNNNN>`` embeddings (tied to the output head) as sinusoids of the bin index instead
    of noise: neighbouring bins then start close, so a box learned for one bin carries to its neighbours
    and a from-scratch model need not learn each of the 1,024 bins on its own."""

    @property
    def image_seq_length(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def build_tokenizer(base_vocab_size: int | None = None) -> GemmaTokenizer:
    """Gemma-style BPE (``▁`` for spaces, byte fallback) trained on a fixed word list: deterministic.

    With ``base_vocab_size`` (Gemma's is 256,000) the BPE vocabulary is padded with never-produced
    ``<unused{k}>`` pieces to exactly that many entries, and ``"\\n"`` moves to id 108 as in Gemma's, so
    ``<loc>``, ``<seg>`` and ``<image>`` get their real ids (256000..257152)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import AddedToken, GemmaTokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.normalizer = normalizers.Replace(" ", "▁")
    bpe.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(
        vocab_size=1200,
        special_tokens=specials + byte_tokens,
        initial_alphabet=list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:?!'\"-_()/\n▁"),
        show_progress=False,
    )
    sentences = [" " + " ".join(_CORPUS_WORDS[i : i + 8]) for i in range(0, len(_CORPUS_WORDS), 8)]
    words = [" " + w for w in _CORPUS_WORDS] + _CORPUS_WORDS  # with and without a leading space
    bpe.train_from_iterator((sentences + words) * 4, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    vocab: dict[str, int] = model["vocab"]
    if base_vocab_size is not None:
        vocab = _padded_vocab(vocab, base_vocab_size)
    tokenizer = GemmaTokenizer(vocab=vocab, merges=merges)  # type: ignore[arg-type]
    # Same order as the real vocabulary: loc, then seg, then the special <image>.
    tokenizer.add_tokens([AddedToken(t, normalized=False) for t in LOC_TOKENS + SEG_TOKENS])
    tokenizer.add_special_tokens({"additional_special_tokens": [AddedToken(IMAGE_TOKEN, normalized=False)]})
    return tokenizer


def _padded_vocab(vocab: dict[str, int], size: int, newline_id: int = 108) -> dict[str, int]:
    """``vocab`` with ``"\\n"`` swapped to ``newline_id`` and ``<unused{k}>`` filler up to ``size`` ids."""
    if size < len(vocab) or size <= newline_id:
        raise ValueError(f"base vocabulary of {size} cannot hold the {len(vocab)} BPE pieces")
    out = dict(vocab)
    by_id = {i: t for t, i in out.items()}
    displaced, old = by_id[newline_id], out["\n"]
    out[displaced], out["\n"] = old, newline_id
    out |= {f"<unused{k}>": i for k, i in enumerate(range(len(vocab), size))}
    return out


def build_processor(tokenizer: Any, image_size: int, image_seq_length: int) -> PaliGemmaProcessor:
    """SigLIP preprocessing as in the released checkpoints: bicubic square resize, scale to [-1, 1]."""
    from transformers import PaliGemmaProcessor, SiglipImageProcessor

    image_processor = SiglipImageProcessor(
        size={"height": image_size, "width": image_size},
        resample=3,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    image_processor.image_seq_length = image_seq_length  # type: ignore[attr-defined]
    return PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_tiny_model(tokenizer: Any, cfg: TinyConfig, seed: int) -> PaliGemmaForConditionalGeneration:
    """Randomly initialised PaliGemma with the tokenizer's vocabulary (padded to a multiple of 64)."""
    import torch
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    vocab_size = -(-len(tokenizer) // 64) * 64
    text_config: dict[str, Any] = {
        "model_type": cfg.text_model,
        "vocab_size": vocab_size,
        "hidden_size": cfg.text_hidden,
        "num_hidden_layers": cfg.text_layers,
        "num_attention_heads": cfg.text_heads,
        "num_key_value_heads": cfg.text_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.intermediate,
        "max_position_embeddings": 1024,
    }
    if cfg.text_model == "gemma2":
        text_config |= {
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
            "query_pre_attn_scalar": 256,  # not head_dim (64), so a wrong attention scale shows
            "sliding_window": cfg.sliding_window,
            "layer_types": [("sliding_attention", "full_attention")[i % 2] for i in range(cfg.text_layers)],
        }
    config = PaliGemmaConfig(  # type: ignore[call-arg]
        text_config=text_config,
        vision_config={
            "hidden_size": cfg.vision_hidden,
            "num_hidden_layers": cfg.vision_layers,
            "num_attention_heads": cfg.vision_heads,
            "intermediate_size": cfg.intermediate,
            "image_size": cfg.image_size,
            "patch_size": cfg.patch_size,
            "vision_use_head": False,
        },
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projection_dim=cfg.text_hidden,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config)
    if cfg.init_std is not None:
        embedding_weight = model.get_input_embeddings().weight
        with torch.no_grad():
            for param in model.parameters():
                if param.dim() >= 2 and not (cfg.text_model == "gemma2" and param is embedding_weight):
                    param.normal_(0.0, cfg.init_std)
            if cfg.text_model == "gemma2":
                # Gemma 2 normalises each block's output before adding it to the residual stream, so a large
                # embedding (scaled by sqrt(hidden) at the input) would swamp it and the model would repeat its
                # input token. The (tied) embedding keeps its small init; the final norm's gain (x20) keeps
                # the next-token distribution from being flat.
                model.model.language_model.norm.weight.fill_(19.0)
    if cfg.sinusoid_locs:
        with torch.no_grad():
            embedding = cast("torch.Tensor", model.get_input_embeddings().weight)
            ids = tokenizer.convert_tokens_to_ids(list(LOC_TOKENS))
            rows = sinusoid_rows(len(LOC_TOKENS), cfg.text_hidden)
            embedding[ids] = rows * (embedding.norm(dim=1).mean() / rows.norm(dim=1).mean())  # the init's scale
    return model.eval()


def sinusoid_rows(count: int, width: int) -> torch.Tensor:
    """``count`` rows of ``sin``/``cos`` of the row index at ``width // 2`` frequencies, with periods spaced
    geometrically from four times ``count`` (smooth over the whole range) down to 8 rows."""
    import torch

    periods = torch.logspace(math.log10(4 * count), math.log10(8), width // 2, dtype=torch.float64)
    angles = torch.arange(count, dtype=torch.float64)[:, None] * (2 * math.pi / periods)[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


HUB_RENAMES = (
    ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)
"""transformers 5 module names -> the hub key layout vLLM expects (first matching prefix wins)."""


def hub_name(key: str) -> str:
    """The hub key name of a transformers 5 ``PaliGemmaForConditionalGeneration`` state-dict key."""
    return next((new + key[len(old) :] for old, new in HUB_RENAMES if key.startswith(old)), key)


def hub_tensors(
    model: torch.nn.Module, state_dict: dict[str, torch.Tensor] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hub name, tensor)`` for the model's weights (or ``state_dict``: a sharded model's, gathered), tied
    ``lm_head`` left out; the tensors are the model's own (detached, not copied): walking them costs nothing."""
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    for key, tensor in (model.state_dict() if state_dict is None else state_dict).items():
        if tied and key.startswith("lm_head."):
            continue
        yield hub_name(key), tensor.detach()


def set_config_dtype(config: Any, dtype: torch.dtype) -> None:
    """Record ``dtype`` as the weights' dtype in a PaliGemma config and its text and vision sub-configs
    (``from_pretrained(dtype=float32)`` leaves ``float32`` in the sub-configs otherwise)."""
    config.dtype = dtype
    for sub in ("text_config", "vision_config"):
        if getattr(config, sub, None) is not None:
            getattr(config, sub).dtype = dtype


def save_checkpoint(
    model: PaliGemmaForConditionalGeneration,
    processor: Any,
    out_dir: str | Path,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write config, hub-layout safetensors, tokenizer and processor to ``out_dir`` (the weights of
    ``state_dict`` when given: an FSDP-sharded model's, gathered whole).

    The weights stream through :class:`paligemma.shards.ShardedWriter`, each cast to ``dtype`` on its own:
    peak memory is the model plus one shard (``max_shard_bytes``), and a checkpoint larger than that is
    written as ``model-0000i-of-0000N.safetensors`` shards with ``model.safetensors.index.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with ShardedWriter(out, max_shard_bytes) as writer:
        for name, tensor in hub_tensors(model, state_dict):
            cast_tensor = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
            writer.add(name, cast_tensor)
            del cast_tensor
    if dtype is not None:
        set_config_dtype(model.config, dtype)
    model.config.architectures = ["PaliGemmaForConditionalGeneration"]  # also for FSDP's wrapper subclass
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_tiny_checkpoint(out_dir: str | Path, seed: int = 0, cfg: TinyConfig | None = None) -> Path:
    """Write a tiny random PaliGemma that transformers and vLLM (CPU) both load."""
    cfg = cfg or TinyConfig()
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer, cfg.image_size, cfg.image_seq_length)
    model = build_tiny_model(processor.tokenizer, cfg, seed)
    out = save_checkpoint(model, processor, out_dir)
    (out / "tiny_config.json").write_text(json.dumps({**asdict(cfg), "seed": seed}, indent=2) + "\n")
    return out


def is_adapter(path: str | Path) -> bool:
    """A peft LoRA adapter directory (``adapter_config.json``), not a full checkpoint."""
    return (Path(path) / "adapter_config.json").is_file()


def adapter_base(adapter: str | Path) -> str | None:
    """The base model an adapter was trained on: ``base_model_name_or_path`` from its config, taken
    relative to the adapter's own folder when it names a folder there (a shipped adapter says ``../demo``,
    so it still finds its base in any clone), else as written (an absolute path or a hub id)."""
    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        return None
    beside = Path(adapter) / str(base)
    return str(beside.resolve()) if not Path(base).is_absolute() and beside.is_dir() else str(base)
