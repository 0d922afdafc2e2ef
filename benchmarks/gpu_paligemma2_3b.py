"""PaliGemma 2 3B (224 px) on one GPU: a one-image-at-a-time ``generate`` loop vs the service's batched
transformers engine (``service.engines.hf_engine.HFEngine``), in images/s and as a fraction of the GPU's compute.

Nothing is downloaded. The model has the real PaliGemma 2 3B-224 shapes with random weights, built in
bf16 directly on the GPU (no 12 GB float32 copy on the CPU):

- text: Gemma 2 2B (hidden 2304, 26 layers, 8 heads, 4 KV heads, head_dim 256, MLP 9216, vocab 257216);
- vision: SigLIP So400m/14 at 224 px (hidden 1152, 27 layers, 16 heads, MLP 4304, 256 image tokens);
- projector: 1152 -> 2304.

The tokenizer is generated with the real vocabulary size and layout (byte fallback, 256000 filler pieces,
``<loc0000>``..``<loc1023>`` at 256000, ``<seg000>``..``<seg127>`` at 257024, ``<image>`` at 257152), and
the real SigLIP preprocessing runs on every image, so the engine path measured is the one the service
runs. Every image is distinct (random noise at 640x480), so no cache can flatter the numbers.

FLOPs per image (matmul FLOPs, 2 per multiply-add, counted from the built model's parameter counts):

    vision   2 * P_vision * 256           (every patch goes through every SigLIP weight once)
    prefill  2 * P_text_body * prompt     (256 image tokens + the task prefix + "\\n")
    decode   2 * (P_text_body + P_lm_head) * generated
    attn     4 * layers * heads * head_dim * (prompt^2 + prompt * generated)   (QK^T and AV; ~2%)

P_text_body excludes the embedding table (a lookup, not a matmul); the LM head (tied to the embeddings,
2304 x 257216 = 0.59 G) runs once per generated token (generate computes logits only for the last prompt
position). With ~3 G parameters and ~266 prompt tokens this is the "about 1.6 TFLOP per 224 px image" of
``2 * params * tokens``; the script prints the exact figure for the measured token counts. Only tokens a
request keeps count (rows of a batch that stopped early still cost compute: that is lost utilisation).
Utilisation = achieved FLOP/s / the GPU's dense bf16 peak (H100 SXM 989 TFLOP/s; override with --peak-tflops).

Run (about 1-2 minutes on an H100, well under 5):

    python benchmarks/gpu_paligemma2_3b.py                       # table on stdout, JSON to $OUT if set
    python benchmarks/gpu_paligemma2_3b.py --dry-run             # tiny shapes on the CPU, seconds (a smoke test)
"""

# ruff: noqa: T201  (a command-line benchmark: the table goes to stdout)
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

VOCAB_SIZE = 257216
IMAGE_TOKEN_ID = 257152
PEAK_BF16_TFLOPS = {
    "H100 SXM": 989.4,
    "H100 80GB HBM3": 989.4,
    "H200": 989.4,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
}
PREFIX = "detect cat ; dog"


@dataclass
class Shapes:
    text_hidden: int = 2304
    text_layers: int = 26
    text_heads: int = 8
    text_kv_heads: int = 4
    head_dim: int = 256
    text_mlp: int = 9216
    vision_hidden: int = 1152
    vision_layers: int = 27
    vision_heads: int = 16
    vision_mlp: int = 4304
    image_size: int = 224
    patch_size: int = 14

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


DRY_RUN_SHAPES = Shapes(
    text_hidden=128,
    text_layers=2,
    text_heads=2,
    text_kv_heads=1,
    head_dim=64,
    text_mlp=256,
    vision_hidden=64,
    vision_layers=2,
    vision_heads=2,
    vision_mlp=128,
    image_size=112,
)


@dataclass
class Result:
    name: str
    batch: int
    images: int
    seconds: float = 0.0
    images_per_s: float = 0.0
    generate_calls: int = 0
    generated_tokens: int = 0
    tflop: float = 0.0
    tflops_per_s: float = 0.0
    utilisation: float | None = None
    error: str | None = None
    notes: dict[str, Any] = field(default_factory=dict)


def build_tokenizer() -> Any:
    """Gemma-layout tokenizer with the real vocabulary size; no merges (text falls back to characters/bytes)."""
    from transformers import AddedToken, GemmaTokenizer

    from paligemma.tokens import LOC_TOKENS, SEG_TOKENS

    vocab: dict[str, int] = {}
    for tok in ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "\n", "▁"]:
        vocab[tok] = len(vocab)
    for i in range(256):
        vocab[f"<0x{i:02X}>"] = len(vocab)
    for ch in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:?!'\"-_()/":
        vocab.setdefault(ch, len(vocab))
    i = 0
    while len(vocab) < 256000:  # filler pieces standing in for Gemma's 256k SentencePiece vocabulary
        vocab[f"▁w{i}"] = len(vocab)
        i += 1
    for tok in [*LOC_TOKENS, *SEG_TOKENS]:
        vocab[tok] = len(vocab)
    assert len(vocab) == IMAGE_TOKEN_ID
    vocab["<image>"] = len(vocab)
    while len(vocab) < VOCAB_SIZE:  # the model's padded embedding rows, so every id decodes
        vocab[f"<unused{len(vocab)}>"] = len(vocab)
    tokenizer = GemmaTokenizer(vocab=vocab, merges=[])  # type: ignore[arg-type]
    tokenizer.add_tokens([AddedToken(t, normalized=False) for t in LOC_TOKENS + SEG_TOKENS])
    tokenizer.add_special_tokens({"additional_special_tokens": [AddedToken("<image>", normalized=False)]})
    assert tokenizer.convert_tokens_to_ids("<image>") == IMAGE_TOKEN_ID, tokenizer.convert_tokens_to_ids("<image>")
    return tokenizer


def build_model(shapes: Shapes, tokenizer: Any, device: str, dtype: Any) -> Any:
    """PaliGemma 2 with random weights, allocated and initialised directly on ``device`` in ``dtype``."""
    import torch
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    config = PaliGemmaConfig(  # type: ignore[call-arg]
        text_config={
            "model_type": "gemma2",
            "vocab_size": VOCAB_SIZE,
            "hidden_size": shapes.text_hidden,
            "num_hidden_layers": shapes.text_layers,
            "num_attention_heads": shapes.text_heads,
            "num_key_value_heads": shapes.text_kv_heads,
            "head_dim": shapes.head_dim,
            "intermediate_size": shapes.text_mlp,
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": shapes.head_dim,
            "sliding_window": 4096,
            "final_logit_softcapping": 30.0,
            "attn_logit_softcapping": 50.0,
            "max_position_embeddings": 8192,
        },
        vision_config={
            "hidden_size": shapes.vision_hidden,
            "num_hidden_layers": shapes.vision_layers,
            "num_attention_heads": shapes.vision_heads,
            "intermediate_size": shapes.vision_mlp,
            "image_size": shapes.image_size,
            "patch_size": shapes.patch_size,
            "vision_use_head": False,
        },
        image_token_index=IMAGE_TOKEN_ID,
        projection_dim=shapes.text_hidden,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = PaliGemmaForConditionalGeneration._from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def parameter_counts(model: Any) -> dict[str, int]:
    counts = {"vision": 0, "projector": 0, "text_body": 0, "embedding": 0}
    for name, param in model.named_parameters():
        if "vision_tower" in name:
            counts["vision"] += param.numel()
        elif "multi_modal_projector" in name:
            counts["projector"] += param.numel()
        elif "embed_tokens" in name:
            counts["embedding"] += param.numel()
        elif "lm_head" not in name:  # tied to the embeddings
            counts["text_body"] += param.numel()
    counts["total"] = sum(counts.values())
    return counts


def flops_per_image(counts: dict[str, int], shapes: Shapes, prompt: int, generated: float) -> float:
    lm_head = counts["embedding"]
    vision = 2 * (counts["vision"] + counts["projector"]) * shapes.image_tokens
    vision += 4 * shapes.vision_layers * shapes.vision_hidden * shapes.image_tokens**2
    prefill = 2 * counts["text_body"] * prompt
    decode = 2 * (counts["text_body"] + lm_head) * generated
    attn_width = shapes.text_layers * shapes.text_heads * shapes.head_dim
    attn = 4 * attn_width * (prompt**2 + prompt * generated + generated**2 / 2)
    return float(vision + prefill + decode + attn)


def make_images(n: int, seed: int) -> list[Any]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)) for _ in range(n)]


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_loop(model: Any, processor: Any, images: list[Any], max_new: int, device: str) -> tuple[float, int, int]:
    """One image per ``generate`` call; returns (seconds, generated tokens kept, calls)."""
    import torch

    eos = model.generation_config.eos_token_id
    tokens = 0
    sync(device)
    start = time.perf_counter()
    for image in images:
        inputs = processor(text=["<image>" + PREFIX], images=[image], return_tensors="pt")
        inputs = {k: v.to(model.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new, do_sample=False, num_beams=1)
        new = out[0, inputs["input_ids"].shape[1] :].tolist()
        tokens += new.index(eos) if eos in new else len(new)
    sync(device)
    return time.perf_counter() - start, tokens, len(images)


async def run_engine(model: Any, processor: Any, images: list[Any], batch: int, max_new: int) -> tuple[float, int, int]:
    """All images submitted at once to ``HFEngine`` (batches of ``batch``); returns (seconds, tokens, calls)."""
    from service.engines.hf_engine import HFEngine
    from service.engines.protocol import GenerationRequest

    engine = HFEngine(
        model,
        processor,
        model_name="paligemma2-3b-random",
        max_batch_size=batch,
        batch_window_s=0.05,
        max_queue_size=len(images) + 1,
    )
    engine.start()
    try:
        requests = [
            GenerationRequest(image=im, prefix=PREFIX, max_new_tokens=max_new, request_id=str(i))
            for i, im in enumerate(images)
        ]
        start = time.perf_counter()
        results = await asyncio.gather(*(engine.generate(r) for r in requests))
        seconds = time.perf_counter() - start
        calls = int(engine.stats()["generate_calls"])
    finally:
        await engine.aclose()
    return seconds, sum(r.completion_tokens for r in results), calls


def preprocess_ms_per_image(processor: Any, images: list[Any]) -> float:
    start = time.perf_counter()
    processor(text=["<image>" + PREFIX] * len(images), images=images, return_tensors="pt", padding="longest")
    return (time.perf_counter() - start) * 1000 / len(images)


def peak_tflops(device: str, override: float | None) -> tuple[float | None, str]:
    import torch

    if override:
        return override, "given"
    if not device.startswith("cuda"):
        return None, "cpu"
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16_TFLOPS.items():
        if all(part in name for part in key.split()):
            return value, name
    return None, name


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", default="8,32,64", help="engine max_batch_size values")
    parser.add_argument("--batches-per-config", type=int, default=4, help="images per engine run = this x batch")
    parser.add_argument("--loop-images", type=int, default=16, help="images for the one-at-a-time loop")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (float32): a smoke test")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="directory for the JSON (default: $OUT)")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from paligemma.checkpoint import build_processor

    if args.dry_run:
        device, dtype, shapes = "cpu", torch.float32, DRY_RUN_SHAPES
        args.batch_sizes, args.batches_per_config, args.loop_images = "2,4", 2, 2
        args.max_new_tokens = min(args.max_new_tokens, 4)
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: use --dry-run for the CPU smoke test", file=sys.stderr)
            return 2
        device, dtype, shapes = "cuda", torch.bfloat16, Shapes()
        torch.backends.cuda.matmul.allow_tf32 = True
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    peak, gpu = peak_tflops(device, args.peak_tflops)

    t0 = time.perf_counter()
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer, shapes.image_size, shapes.image_tokens)
    t_tok = time.perf_counter() - t0
    model = build_model(shapes, tokenizer, device, dtype)
    sync(device)
    counts = parameter_counts(model)
    prompt_len = int(
        processor(text=["<image>" + PREFIX], images=make_images(1, 99), return_tensors="pt")["input_ids"].shape[1]
    )
    print(
        f"device {gpu}  dtype {dtype}  params {counts['total'] / 1e9:.3f} G "
        f"(vision {counts['vision'] / 1e9:.3f}, text body {counts['text_body'] / 1e9:.3f}, "
        f"embedding/LM head {counts['embedding'] / 1e9:.3f})  prompt {prompt_len} tokens  "
        f"tokenizer {len(tokenizer)} ids built in {t_tok:.1f}s  model built in {time.perf_counter() - t0:.1f}s",
        flush=True,
    )
    nominal = flops_per_image(counts, shapes, prompt_len, args.max_new_tokens)
    print(f"FLOPs per image at {args.max_new_tokens} generated tokens: {nominal / 1e12:.3f} TFLOP", flush=True)
    pre_ms = preprocess_ms_per_image(processor, make_images(16, 98))
    print(f"CPU preprocessing (SigLIP resize/normalise + tokenize): {pre_ms:.1f} ms/image", flush=True)

    def finish(res: Result, seconds: float, tokens: int, calls: int) -> None:
        res.seconds, res.generated_tokens, res.generate_calls = seconds, tokens, calls
        res.images_per_s = res.images / seconds
        per_image_tokens = tokens / res.images
        res.tflop = flops_per_image(counts, shapes, prompt_len, per_image_tokens) * res.images / 1e12
        res.tflops_per_s = res.tflop / seconds
        res.utilisation = res.tflops_per_s / peak if peak else None
        res.notes["generated_tokens_per_image"] = round(per_image_tokens, 2)

    results: list[Result] = []
    # (a) one image per generate call
    res = Result("generate loop (1 image/call)", 1, args.loop_images)
    try:
        run_loop(model, processor, make_images(2, 1), args.max_new_tokens, device)  # warm-up
        finish(res, *run_loop(model, processor, make_images(args.loop_images, 2), args.max_new_tokens, device))
    except torch.cuda.OutOfMemoryError as exc:
        res.error = f"OOM: {str(exc).splitlines()[0]}"
    results.append(res)
    print_row(res)
    # (b) the service's batched engine
    for i, batch in enumerate(batch_sizes):
        res = Result(f"HFEngine max_batch_size={batch}", batch, batch * args.batches_per_config)
        try:
            asyncio.run(run_engine(model, processor, make_images(batch, 10 + i), batch, args.max_new_tokens))
            finish(
                res,
                *asyncio.run(run_engine(model, processor, make_images(res.images, 20 + i), batch, args.max_new_tokens)),
            )
            expected = -(-res.images // batch)
            if res.generate_calls > expected:  # HFEngine retries a failed batch one request at a time
                res.error = f"{res.generate_calls} generate calls for {expected} batches: a batch failed (OOM?)"
        except torch.cuda.OutOfMemoryError as exc:
            res.error = f"OOM: {str(exc).splitlines()[0]}"
        if device.startswith("cuda"):
            res.notes["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
            torch.cuda.reset_peak_memory_stats()
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        results.append(res)
        print_row(res)

    base = results[0].images_per_s or None
    print()
    print(f"{'config':34} {'images':>6} {'calls':>5} {'img/s':>8} {'x loop':>7} {'TFLOP/s':>8} {'of peak':>8}  error")
    for r in results:
        speedup = f"{r.images_per_s / base:7.1f}" if base and r.images_per_s else "      -"
        util = f"{r.utilisation:8.1%}" if r.utilisation is not None else "       -"
        print(
            f"{r.name:34} {r.images:6d} {r.generate_calls:5d} {r.images_per_s:8.2f} {speedup} "
            f"{r.tflops_per_s:8.1f} {util}  {r.error or ''}"
        )
    print(
        f"\npeak used: {peak} TFLOP/s ({gpu}); FLOPs counted per the module docstring; "
        f"{args.max_new_tokens} max new tokens, prompt {prompt_len} tokens; total {time.perf_counter() - t0:.0f}s"
    )
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_paligemma2_3b.json").write_text(
            json.dumps(
                {
                    "device": gpu,
                    "dtype": str(dtype),
                    "dry_run": args.dry_run,
                    "peak_tflops": peak,
                    "params": counts,
                    "prompt_tokens": prompt_len,
                    "max_new_tokens": args.max_new_tokens,
                    "tflop_per_image_at_max_new_tokens": nominal / 1e12,
                    "preprocess_ms_per_image": pre_ms,
                    "results": [asdict(r) for r in results],
                },
                indent=2,
            )
        )
        print(f"wrote {out / 'gpu_paligemma2_3b.json'}")
    return 0 if all(r.error is None for r in results) else 1


def print_row(r: Result) -> None:
    print(
        f"  {r.name}: {r.images} images in {r.seconds:.2f}s = {r.images_per_s:.2f} img/s, "
        f"{r.tflops_per_s:.1f} TFLOP/s, {r.generate_calls} generate calls {r.error or ''}",
        flush=True,
    )


if __name__ == "__main__":
    raise SystemExit(main())
