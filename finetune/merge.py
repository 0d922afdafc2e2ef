"""``merge(cfg)``: a training run -> one checkpoint directory in the hub key layout that vLLM loads.

peft's ``merge_and_unload()`` + ``save_pretrained()`` writes ``vision_tower.embeddings.*``, which vLLM 0.32
rejects (``shared/notes/vllm.md``), so the merged model is written with
:func:`paligemma.checkpoint.save_checkpoint`, with the processor and tokenizer beside it.

Idempotent (the litgpt pattern): ``merge_info.json`` in the output records what was merged (source
directory, a hash of the adapter or model weights, dtype). Asking for the same merge again logs "already
merged" and returns at once; a different adapter or dtype merges again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from finetune.config import MergeConfig, flag
from paligemma.checkpoint import adapter_base, save_checkpoint

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_source(run: Path) -> tuple[str, Path, dict[str, Any]]:
    """``(method, weights_dir, train_config)`` for a training output dir, its adapter/ or its model/."""
    candidates = [run, run / "adapter", run / "model"]
    for path in candidates:
        if (path / "adapter_config.json").is_file():
            return "lora", path, _train_config(path, run)
        if (path / "model.safetensors").is_file() and (path / "config.json").is_file():
            return "full", path, _train_config(path, run)
    raise FileNotFoundError(f"{flag('run')} {run}: no adapter_config.json or model.safetensors in it or below")


def _train_config(path: Path, run: Path) -> dict[str, Any]:
    for candidate in (path / "train_config.json", run / "train_config.json"):
        if candidate.is_file():
            return dict(json.loads(candidate.read_text()))
    return {}


def merge(cfg: MergeConfig) -> Path:
    """Merge (or copy, for a full run) into ``cfg.out`` in dtype ``cfg.dtype``; returns ``cfg.out``."""
    from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor

    method, source, train_cfg = resolve_source(Path(cfg.run))
    weights = source / ("adapter_model.safetensors" if method == "lora" else "model.safetensors")
    base = cfg.base or (adapter_base(source) if method == "lora" else None) or train_cfg.get("base")
    info = {
        "source": str(source.resolve()),
        "method": train_cfg.get("method", method),
        "base": base if method == "lora" else None,
        "weights_sha256": _sha256(weights),
        "dtype": cfg.dtype,
    }
    out = Path(cfg.out)
    marker = out / "merge_info.json"
    if not cfg.force and marker.is_file() and json.loads(marker.read_text()) == info:
        log.info("%s already holds this merge (%s); nothing to do", out, info["weights_sha256"][:12])
        return out
    if method == "lora":
        from peft import PeftModel

        if not base:
            raise ValueError(f"the adapter names no base model; give {flag('base')}")
        model = PaliGemmaForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
        model = PeftModel.from_pretrained(model, str(source)).merge_and_unload()
        processor_dir = source if (source / "processor_config.json").is_file() else Path(base)
    else:
        model = PaliGemmaForConditionalGeneration.from_pretrained(str(source), dtype=torch.float32)
        processor_dir = source
    processor = PaliGemmaProcessor.from_pretrained(str(processor_dir))
    model.eval()  # type: ignore[no-untyped-call]
    save_checkpoint(model, processor, out, dtype=DTYPES[cfg.dtype])
    marker.write_text(json.dumps(info, indent=2) + "\n")
    log.info("merged %s (%s) into %s as %s", source, method, out, cfg.dtype)
    return out
