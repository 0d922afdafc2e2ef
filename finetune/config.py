"""Dataclass configs for every finetune command, and the CLI derived from them.

One source of truth (the litgpt pattern): each field's type, default and attribute docstring become the
``--flag``, its default and its ``--help`` text, so the CLI and the Python API cannot drift apart.
``__post_init__`` errors name the CLI flag, because that is what a user typed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from finetune.options import FlagError, add_arguments, flag, from_args, to_json

Method = Literal["lora", "qlora", "full"]
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class DataConfig:
    """Where training examples come from and how detection records become prompts."""

    coco: tuple[str, ...] = ()
    """COCO detection annotation files (repeatable); images are looked up under --coco-images."""
    coco_images: str | None = None
    """Image folder for --coco files; default: the folder holding each annotation file."""
    jsonl: tuple[str, ...] = ()
    """big_vision-style JSONL files with {"image", "prefix", "suffix"} lines (repeatable)."""
    vqa: tuple[str, ...] = ()
    """VQA JSONL files with {"image", "question", "answer" or "answers"} lines (repeatable)."""
    segment_coco: tuple[str, ...] = ()
    """COCO instance segmentation files (repeatable): 'segment <class>' prompts whose targets are each object's
    4 <loc> and 16 <seg> tokens; needs --segmentation-weights. Images are looked up under --coco-images."""
    segmentation_weights: str | None = None
    """The mask VQ-VAE (vae-oid.npz layout) whose encoder turns --segment-coco masks into <seg> tokens: Google's
    vae-oid.npz for a released PaliGemma, models/shapes-vae/vae-shapes.npz for the demo model."""
    absent_per_image: int = 1
    """Absent classes sampled per detection image, each a 'detect <class>' prompt with an empty target."""
    prompt_style: Literal["multi", "per_class"] = "multi"
    """multi: one 'detect a ; b' prompt per image (present + absent classes); per_class: one per class."""
    segment_prompt_style: Literal["multi", "per_class"] = "per_class"
    """The same for --segment-coco's 'segment' prompts. per_class (one class per prompt, as big_vision's
    segmentation data asks one object per prompt) keeps answers short: a small model loses its boxes after a
    few 20-token objects (the demo: mean mask IoU 0.564 multi, see finetune/recipes/segment_demo.py)."""
    loc_stride: int = 1
    """Round box loc indices to multiples of this (1 = exact; >1 helps tiny from-scratch models, see data.py)."""
    synonyms: tuple[str, ...] = ()
    """Label synonyms as RAW=CANONICAL (e.g. 'sq=square'); applied before prompts are built."""
    on_error: Literal["skip", "fail"] = "skip"
    """Bad records: 'skip' logs each with file and line and goes on; 'fail' stops at the first."""

    def __post_init__(self) -> None:
        if self.absent_per_image < 0:
            raise ValueError(f"{flag('absent_per_image')} must be >= 0, got {self.absent_per_image}")
        if not 1 <= self.loc_stride <= 64:
            raise ValueError(f"{flag('loc_stride')} must be between 1 and 64, got {self.loc_stride}")
        if self.segment_coco and not self.segmentation_weights:
            raise ValueError(f"{flag('segment_coco')} needs {flag('segmentation_weights')}: the VQ-VAE encoding masks")
        for pair in self.synonyms:
            if "=" not in pair or not all(part.strip() for part in pair.split("=", 1)):
                raise ValueError(f"{flag('synonyms')} entries look like RAW=CANONICAL, got {pair!r}")

    @property
    def synonym_map(self) -> dict[str, str]:
        return dict(tuple(p.strip() for p in pair.split("=", 1)) for pair in self.synonyms)  # type: ignore[misc]


@dataclass
class TrainConfig(DataConfig):
    """Training run: model, method, optimiser and budget. Data fields come from :class:`DataConfig`."""

    base: str = ""
    """Base model directory (hub layout, e.g. from `python -m finetune tiny`)."""
    out: str = ""
    """Output directory: checkpoints, adapter/ or model/, train_config.json, learning_curve.json."""
    method: Method = "lora"
    """lora (peft), qlora (4-bit base, CUDA only) or full (every unfrozen weight)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA branch."""
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    """Linear layers of the language model that get LoRA (the vision tower's q/k/v are left alone)."""
    freeze_vision: bool = False
    """Freeze the SigLIP vision tower (method full; LoRA never touches it)."""
    freeze_projector: bool = False
    """Freeze the multi-modal projector (method full; LoRA never touches it)."""
    lr: float = 2e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    scheduler: str = "constant_with_warmup"
    """transformers lr scheduler name (constant_with_warmup, cosine, linear, ...)."""
    batch_size: int = 8
    """Examples per device per step."""
    grad_accum: int = 1
    """Gradient accumulation steps."""
    max_steps: int = -1
    """Stop after this many optimiser steps (-1: use --epochs)."""
    epochs: float = 1.0
    """Passes over the data when --max-steps is -1."""
    max_minutes: float | None = None
    """Wall-clock safety stop: training stops cleanly (and saves) when it is spent. What a run then
    learns depends on the machine's speed, so recipes that figures or tests depend on bound steps instead."""
    decay_steps: int = 0
    """With --max-steps: the learning rate falls linearly to 0 over the last N steps (warmup-stable-decay,
    transformers' ``warmup_stable_decay`` scheduler; replaces --scheduler)."""
    max_length: int | None = None
    """Longest tokenized example: image tokens + prompt + answer. Default: what the longest example needs
    (the checkpoint's image tokens, 256 to 4,096, plus its text), so nothing is cut. A smaller value cuts
    answers only; one that leaves no room for the image tokens and a prompt is refused before training."""
    logging_steps: int = 10
    """Log (and record on the learning curve) every N steps."""
    save_steps: int = 500
    """Trainer checkpoint every N steps (for --resume)."""
    save_total_limit: int = 2
    """Trainer checkpoints kept."""
    resume: bool = False
    """Resume from the newest checkpoint-N in --out."""
    seed: int = 0
    """Seed for sampling, shuffling and initialising LoRA."""
    threads: int | None = None
    """torch CPU threads (None: torch's default)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 on a GPU that supports it; on the CPU bf16 for a bfloat16 checkpoint (real sizes) where the
    CPU runs it (AVX2 and up), fp32 otherwise (the tiny and demo models)."""
    gradient_checkpointing: bool | None = None
    """None: on for a GPU; on the CPU on for models over 1 B parameters (every real PaliGemma, whose
    activations would not fit memory), off for the tiny ones (where it only costs time)."""
    keep_sliding_window: bool = False
    """PaliGemma 2: keep the checkpoint's Gemma 2 sliding window (default: every text layer global, as
    big_vision trained PaliGemma 2; it matters only at 896 px, docs/how-paligemma-works.md section 8)."""
    snapshot_steps: tuple[int, ...] = ()
    """Also save the model after these optimiser steps (for a held-out learning curve)."""
    workers: int | None = None
    """DataLoader worker processes, which decode and resize the images (default: 4 on a GPU, capped by the
    CPU count; 0 on the CPU, where workers would take cores from the model)."""
    eval_coco: str | None = None
    """Held-out COCO detection file, scored (mAP@0.5) while training: every --eval-steps and at the end."""
    eval_coco_images: str | None = None
    """Image folder for --eval-coco (default: the folder holding the file)."""
    eval_vqa: str | None = None
    """Held-out VQA JSONL, scored (accuracy) while training: every --eval-steps and at the end."""
    eval_steps: int | None = None
    """Score the held-out data every N optimiser steps (default: with every checkpoint, --save-steps)."""
    eval_limit: int | None = None
    """Score only the first N held-out images and questions (default: all of them)."""
    keep_best: bool = False
    """Save the model with the best held-out score to best/ (mAP@0.5 with --eval-coco, else VQA accuracy)."""
    report_to: tuple[str, ...] = ()
    """Experiment trackers the Trainer logs to (tensorboard, wandb, mlflow, ...; default: none). TensorBoard
    writes to OUT/runs/: watch with `tensorboard --logdir OUT/runs`."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.base:
            raise ValueError(f"{flag('base')} is required: a base model directory")
        if not self.out:
            raise ValueError(f"{flag('out')} is required: an output directory")
        if not (self.coco or self.segment_coco or self.jsonl or self.vqa):
            raise ValueError(
                f"no training data: give {flag('coco')}, {flag('segment_coco')}, {flag('jsonl')} or {flag('vqa')}"
            )
        if self.method not in ("lora", "qlora", "full"):
            raise ValueError(f"{flag('method')} must be lora, qlora or full, got {self.method!r}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"{flag('max_length')} must be >= 2, got {self.max_length}")
        for name in ("batch_size", "grad_accum", "lora_r", "logging_steps", "save_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{flag(name)} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"{flag('lr')} must be positive, got {self.lr}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"{flag('max_minutes')} must be positive, got {self.max_minutes}")
        if self.decay_steps < 0 or (self.decay_steps and self.max_steps < self.warmup_steps + self.decay_steps):
            raise ValueError(
                f"{flag('decay_steps')} must be >= 0 and fit in {flag('max_steps')} after {flag('warmup_steps')}"
            )
        if self.decay_steps and self.scheduler != "constant_with_warmup":
            raise ValueError(f"{flag('decay_steps')} sets the schedule itself: leave {flag('scheduler')} unset")
        if any(step < 1 for step in self.snapshot_steps):
            raise ValueError(f"{flag('snapshot_steps')} must be >= 1")
        if self.max_steps == -1 and self.epochs <= 0:
            raise ValueError(f"give {flag('max_steps')} or a positive {flag('epochs')}")
        for name in ("workers", "eval_steps", "eval_limit"):
            value = getattr(self, name)
            if value is not None and value < (0 if name == "workers" else 1):
                raise ValueError(f"{flag(name)} must be >= {0 if name == 'workers' else 1}, got {value}")
        if self.keep_best and not (self.eval_coco or self.eval_vqa):
            raise ValueError(f"{flag('keep_best')} needs held-out data: give {flag('eval_coco')} or {flag('eval_vqa')}")


@dataclass
class MergeConfig:
    """Adapter (or full run) -> one hub-layout checkpoint directory that vLLM and transformers load."""

    run: str = ""
    """Training output directory (holding train_config.json), or an adapter directory."""
    out: str = ""
    """Merged checkpoint directory."""
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """Weights dtype of the merged checkpoint."""
    base: str | None = None
    """Override the base model recorded in the adapter (e.g. after moving it)."""
    force: bool = False
    """Merge again even if --out already holds this merge."""

    def __post_init__(self) -> None:
        if not self.run:
            raise ValueError(f"{flag('run')} is required: a training output or adapter directory")
        if not self.out:
            raise ValueError(f"{flag('out')} is required: where to write the merged checkpoint")


@dataclass
class EvalConfig:
    """Evaluate a model on held-out detection and/or VQA data through a service engine."""

    model: str = ""
    """Model directory (hub layout, e.g. a merged checkpoint)."""
    out: str = ""
    """Report directory: report.json, predictions.json, pictures/."""
    coco: str | None = None
    """COCO annotation file of the held-out detection set."""
    coco_images: str | None = None
    """Image folder for --coco (default: the annotation file's folder)."""
    vqa: str | None = None
    """VQA JSONL of the held-out set."""
    segmentation_weights: str | None = None
    """Evaluate segmentation: 'segment' prompts on --coco (which must hold segmentations), masks decoded with
    this VQ-VAE (vae-oid.npz layout); reports mask IoU and mask mAP (pycocotools 'segm') beside box mAP."""
    engine: Literal["transformers", "vllm"] = "transformers"
    """Which service engine generates."""
    classes: tuple[str, ...] = ()
    """Classes to prompt for on every image (default: all categories of --coco); ground truth and mAP are
    then limited to them."""
    classes_per_prompt: int = 0
    """Classes asked per detect prompt (0: all in one prompt, as trained with --prompt-style multi)."""
    segment_classes_per_prompt: int = 1
    """Classes asked per segment prompt (1: one, as trained with --segment-prompt-style per_class; 0: all)."""
    limit: int | None = None
    """Use only the first N images / questions."""
    pictures: int = 8
    """Comparison pictures (ground truth green, predictions blue) for the first N images."""
    max_new_tokens: int = 64
    """Generation limit per detection prompt (VQA uses 16)."""
    concurrency: int = 64
    """Requests in flight at once (the engine batches them)."""
    device: str = "auto"
    """Device for the transformers engine (auto, cpu, cuda)."""
    keep_sliding_window: bool = False
    """PaliGemma 2: serve with the checkpoint's Gemma 2 sliding window (default: every text layer global, as
    big_vision trained it and as the service serves it)."""
    compare: str | None = None
    """Base model to compare --model against on the same images (pictures: base left, --model right)."""
    sheet: int = 8
    """With --compare: comparisons in contact_sheet.png (0: none)."""

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError(f"{flag('model')} is required: a model directory")
        if not self.out:
            raise ValueError(f"{flag('out')} is required: a report directory")
        if not (self.coco or self.vqa):
            raise ValueError(f"nothing to evaluate: give {flag('coco')} and/or {flag('vqa')}")
        if self.concurrency < 1:
            raise ValueError(f"{flag('concurrency')} must be >= 1")
        if self.sheet < 0 or self.pictures < 0:
            raise ValueError(f"{flag('pictures')} and {flag('sheet')} must be >= 0")


__all__ = [
    "DEFAULT_LORA_TARGETS",
    "DataConfig",
    "EvalConfig",
    "FlagError",
    "MergeConfig",
    "Method",
    "TrainConfig",
    "add_arguments",
    "flag",
    "from_args",
    "to_json",
]
