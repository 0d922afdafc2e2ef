"""``merge(cfg)``: a training run -> one checkpoint directory in the hub key layout that vLLM loads.

peft's ``merge_and_unload()`` + ``save_pretrained()`` writes ``vision_tower.embeddings.*``, which vLLM 0.32
rejects (``shared/notes/vllm.md``), so the merged model is written with
:func:`paligemma.checkpoint.save_checkpoint`, with the processor and tokenizer beside it.

Idempotent (the litgpt pattern): ``merge_info.json`` in the output records what was merged (source
directory, a hash of the adapter or model weights, dtype). Asking for the same merge again logs "already
merged" and returns at once; a different adapter or dtype merges again.

Bounded memory: a LoRA merge never builds the model. It reads the base checkpoint one tensor at a time,
adds ``scale * B @ A`` (in float32) to each weight the adapter targets, casts to the output dtype and hands
the tensor to :class:`paligemma.shards.ShardedWriter`, so the peak is about one output shard (2 GiB by
default) plus the adapter; a full run is copied the same way, with the cast. Outputs above the shard size
are sharded with ``model.safetensors.index.json``, as the hub's checkpoints are.

What the stream merges exactly is plain LoRA on ``nn.Linear`` weights: ``lora_alpha / r`` (or
``/ sqrt(r)`` with ``use_rslora``), ``rank_pattern`` / ``alpha_pattern``, ``fan_in_fan_out``. An adapter
it cannot merge that way (DoRA ``use_dora``, ``modules_to_save``, LoRA biases, embedding or other
non-Linear targets, ``target_parameters``, trainable tokens, layer replication: any tensor other than
``lora_A``/``lora_B`` weight matrices) falls back to peft's ``merge_and_unload()`` on the model loaded in
float32 (about 4 bytes per parameter plus one shard; logged as a warning), still written by the streaming
:func:`paligemma.checkpoint.save_checkpoint`. Every adapter tensor must find its base weight: a mismatch
raises rather than writing a partial merge.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finetune.config import MergeConfig
from finetune.options import flag
from paligemma.checkpoint import adapter_base, hub_name, save_checkpoint, set_config_dtype
from paligemma.shards import (
    DEFAULT_SHARD_BYTES,
    INDEX_FILE,
    ShardedWriter,
    checkpoint_files,
    has_weights,
    iter_checkpoint_tensors,
)

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _sha256(*paths: Path) -> str:
    """sha256 of the files' bytes one after the other (one file: that file's own sha256)."""
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def weights_sha256(method: str, source: Path) -> str:
    """The hash ``merge_info.json`` records: the adapter file, the single ``model.safetensors``, or a
    sharded model's index followed by its shards."""
    if method == "lora":
        return _sha256(source / "adapter_model.safetensors")
    files = checkpoint_files(source)
    index = source / INDEX_FILE
    return _sha256(*([index] if index.is_file() else []), *files)


def resolve_source(run: Path) -> tuple[str, Path, dict[str, Any]]:
    """``(method, weights_dir, train_config)`` for a training output dir, its adapter/ or its model/."""
    candidates = [run, run / "adapter", run / "model"]
    for path in candidates:
        if (path / "adapter_config.json").is_file():
            return "lora", path, _train_config(path, run)
        if has_weights(path) and (path / "config.json").is_file():
            return "full", path, _train_config(path, run)
    raise FileNotFoundError(
        f"{flag('run')} {run}: no adapter_config.json or model.safetensors (or its index) in it or below"
    )


def _train_config(path: Path, run: Path) -> dict[str, Any]:
    for candidate in (path / "train_config.json", run / "train_config.json"):
        if candidate.is_file():
            return dict(json.loads(candidate.read_text()))
    return {}


def merge(cfg: MergeConfig, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Merge (or copy, for a full run) into ``cfg.out`` in dtype ``cfg.dtype``; returns ``cfg.out``.

    Streams tensor by tensor (see the module docstring); outputs larger than ``max_shard_bytes`` are
    sharded."""
    method, source, train_cfg = resolve_source(Path(cfg.run))
    base = cfg.base or (adapter_base(source) if method == "lora" else None) or train_cfg.get("base")
    info = {
        "source": str(source.resolve()),
        "method": train_cfg.get("method", method),
        "base": base if method == "lora" else None,
        "weights_sha256": weights_sha256(method, source),
        "dtype": cfg.dtype,
    }
    out = Path(cfg.out)
    marker = out / "merge_info.json"
    if not cfg.force and marker.is_file() and json.loads(marker.read_text()) == info:
        log.info("%s already holds this merge (%s); nothing to do", out, info["weights_sha256"][:12])
        return out
    out.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)  # a merge that dies half way must not pass for the earlier one
    dtype = DTYPES[cfg.dtype]
    if method == "lora":
        if not base:
            raise ValueError(f"the adapter names no base model; give {flag('base')}")
        base_dir = _local_dir(base)
        processor_dir = source if (source / "processor_config.json").is_file() else base_dir
        adapter = read_lora(source)
        if isinstance(adapter, str):
            log.warning(
                "streaming merge cannot merge %s exactly (%s): peft merge_and_unload in float32", source, adapter
            )
            _peft_merge(base_dir, source, processor_dir, out, dtype, max_shard_bytes)
        else:
            _stream(base_dir, adapter, out, dtype, max_shard_bytes)
            _write_configs(base_dir, processor_dir, out, dtype)
    else:
        _stream(source, {}, out, dtype, max_shard_bytes)
        _write_configs(source, source, out, dtype)
    marker.write_text(json.dumps(info, indent=2) + "\n")
    log.info("merged %s (%s) into %s as %s", source, method, out, cfg.dtype)
    return out


@dataclass(frozen=True)
class LoraPair:
    """One LoRA update of a Linear weight: ``W += scale * (B @ A)`` (transposed with ``fan_in_fan_out``)."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    fan_in_fan_out: bool
    module: str

    def delta_shape(self) -> tuple[int, int]:
        rows, cols = int(self.b.shape[0]), int(self.a.shape[1])
        return (cols, rows) if self.fan_in_fan_out else (rows, cols)

    def merge_into(self, weight: torch.Tensor, dtype: torch.dtype, block_elements: int = 1 << 20) -> torch.Tensor:
        """``weight + delta`` in ``dtype``, computed in float32 a block of rows at a time (peft's order:
        ``W + (B @ A) * scale``), so the float32 work costs one block, not a float32 copy of the weight.
        Reuses ``weight`` (it must be a tensor the caller owns) when it already has ``dtype``."""
        out = weight if weight.dtype == dtype else torch.empty_like(weight, dtype=dtype)
        a, b = self.a.float(), self.b.float()
        step = max(1, block_elements // max(1, weight.shape[1]))
        for start in range(0, weight.shape[0], step):
            rows = slice(start, start + step)
            product = (a[:, rows].T @ b.T) if self.fan_in_fan_out else (b[rows] @ a)
            product.mul_(self.scale).add_(weight[rows])  # (B @ A) * scale + W, in float32, in place
            out[rows] = product
            del product
        return out


# LoraConfig options the streaming merge does not implement: with any of them set, peft merges instead.
_UNSUPPORTED_OPTIONS = (
    "use_dora",
    "modules_to_save",
    "lora_bias",
    "target_parameters",
    "layer_replication",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "target_modules_to_tie",
)
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")


def _pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    """The ``rank_pattern`` / ``alpha_pattern`` key peft applies to ``module`` (peft's ``get_pattern_key``)."""
    return next((key for key in patterns if re.match(rf"(.*\.)?({key})$", module)), None)


def read_lora(adapter_dir: Path) -> dict[str, LoraPair] | str:
    """``{hub weight name: LoraPair}`` of a plain LoRA adapter, or why the stream cannot merge it."""
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        return f"peft_type {config.get('peft_type')}"
    for option in _UNSUPPORTED_OPTIONS:
        if config.get(option):
            return f"{option}={config[option]!r}"
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _LORA_KEY.match(key)
        if not match or tensor.dim() != 2:
            return f"tensor {key} {tuple(tensor.shape)} is not a LoRA A/B matrix of a Linear layer"
        halves.setdefault(match["module"], {})[match["which"]] = tensor
    rank_pattern: dict[str, int] = config.get("rank_pattern") or {}
    alpha_pattern: dict[str, float] = config.get("alpha_pattern") or {}
    pairs: dict[str, LoraPair] = {}
    for prefix, half in halves.items():
        if set(half) != {"A", "B"}:
            raise ValueError(f"{adapter_dir}: {prefix} has lora_{''.join(half)} but not both lora_A and lora_B")
        module = prefix.removeprefix("base_model.model.")
        r_key, alpha_key = _pattern_key(rank_pattern, module), _pattern_key(alpha_pattern, module)
        r = int(rank_pattern[r_key] if r_key is not None else config["r"])
        alpha = float(alpha_pattern[alpha_key] if alpha_key is not None else config["lora_alpha"])
        a, b = half["A"], half["B"]
        if a.shape[0] != r or b.shape[1] != r:
            raise ValueError(f"{adapter_dir}: {prefix} has rank {a.shape[0]}x{b.shape[1]}, its config says r={r}")
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        name = _hub_key(module + ".weight")
        if name.endswith("lm_head.weight") or name.endswith("embed_tokens.weight"):
            return f"{module} (the tied embedding / output head)"
        pairs[name] = LoraPair(a, b, scale, bool(config.get("fan_in_fan_out")), module)
    return pairs


def _hub_key(key: str) -> str:
    """A base checkpoint's or adapter's key in the hub layout, from either the hub layout itself or
    transformers 5's module names (``model.language_model.*``, ``model.vision_tower.*``)."""
    name = hub_name(key)
    if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
        name = "vision_tower.vision_model." + name.removeprefix("vision_tower.")
    return name


def _tied(config_dir: Path) -> bool:
    from transformers import PaliGemmaConfig

    config = PaliGemmaConfig.from_pretrained(str(config_dir))
    return bool(getattr(config, "tie_word_embeddings", False))


def _stream(weights_dir: Path, pairs: dict[str, LoraPair], out: Path, dtype: torch.dtype, max_shard_bytes: int) -> None:
    """Base tensors -> (+ LoRA) -> ``dtype`` -> shards in ``out``, one tensor at a time."""
    tied = _tied(weights_dir)
    used: set[str] = set()
    with ShardedWriter(out, max_shard_bytes) as writer:
        for key, tensor in iter_checkpoint_tensors(weights_dir):
            name = _hub_key(key)
            if tied and name == "language_model.lm_head.weight":
                continue
            pair = pairs.get(name)
            if pair is not None:
                if pair.delta_shape() != tuple(tensor.shape):
                    raise ValueError(
                        f"LoRA {pair.module} gives {pair.delta_shape()}, base weight {key} is {tuple(tensor.shape)}"
                    )
                result = pair.merge_into(tensor, dtype)
                used.add(name)
            else:
                result = tensor.to(dtype) if tensor.is_floating_point() else tensor
            del tensor  # before the next one is read: one source tensor alive at a time
            writer.add(name, result)
            del result
        missing = sorted(pairs[name].module for name in set(pairs) - used)
        if missing:
            raise ValueError(
                f"{len(missing)} adapter module(s) found no weight in the base checkpoint {weights_dir} "
                f"(wrong base?): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
            )


def _write_configs(config_dir: Path, processor_dir: Path, out: Path, dtype: torch.dtype) -> None:
    """config.json (dtype set to the output's), generation_config.json, processor and tokenizer files: what
    :func:`save_checkpoint` writes beside the weights."""
    from transformers import GenerationConfig, PaliGemmaConfig, PaliGemmaProcessor

    config = PaliGemmaConfig.from_pretrained(str(config_dir))
    set_config_dtype(config, dtype)
    config.architectures = ["PaliGemmaForConditionalGeneration"]
    config.save_pretrained(out)
    try:
        generation = GenerationConfig.from_pretrained(str(config_dir))
    except OSError:
        generation = GenerationConfig.from_model_config(config)
    generation.save_pretrained(out)
    PaliGemmaProcessor.from_pretrained(str(processor_dir)).save_pretrained(out)


def _peft_merge(
    base_dir: Path, adapter_dir: Path, processor_dir: Path, out: Path, dtype: torch.dtype, max_shard_bytes: int
) -> None:
    """peft's own merge, for adapters the stream cannot merge exactly; the save still streams."""
    from peft import PeftModel
    from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor

    model = PaliGemmaForConditionalGeneration.from_pretrained(str(base_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    processor = PaliGemmaProcessor.from_pretrained(str(processor_dir))
    model.eval()
    save_checkpoint(model, processor, out, dtype=dtype, max_shard_bytes=max_shard_bytes)


def _local_dir(base: str) -> Path:
    """``base`` as a local directory: itself, or its snapshot in the hub cache (offline)."""
    if Path(base).is_dir():
        return Path(base)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id=base))
