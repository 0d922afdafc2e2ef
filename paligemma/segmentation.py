"""Masks from PaliGemma's 16 ``<segNNN>`` codewords: big_vision's VQ-VAE decoder, in PyTorch.

Pipeline for one detection (``paligemma-format.md`` section 6)::

    16 indices -> codebook rows [16, D] -> 4x4xD grid (row-major) -> decoder -> 64x64 logits
               -> bilinear resize to the pixel box -> threshold > 0 -> bool mask of the whole image

The decoder (keys as in ``vae-oid.npz``, PyTorch layout, so the file loads with ``strict=True``):

==========================  =========================================================  ==============
key                         layer                                                      shape after
==========================  =========================================================  ==============
``_vq_vae._embedding``      codebook ``[128, D]`` (D read from the file)               4x4xD
``decoder.0``               conv 1x1 -> 128, ReLU                                      4x4x128
``decoder.2/3.net.0/2/4``   ResBlock: conv3x3, ReLU, conv3x3, ReLU, conv1x1, + skip    4x4x128
``decoder.4/6/8/10``        ConvTranspose2d(k=4, s=2, padding=1) + ReLU: 128,64,32,16  64x64x16
``decoder.12``              conv 1x1 -> 1                                              64x64x1
==========================  =========================================================  ==============

The same file holds the encoder (``encoder.*``, read by :mod:`paligemma.mask_encoder`) and the EMA
buffers ``_vq_vae._ema_w`` / ``_vq_vae._ema_cluster_size``, which nothing here reads.

The weights are big_vision's ``vae-oid.npz`` (Apache-2.0), which users download themselves from
``gs://big_vision/paligemma/vae-oid.npz``; the service reads its path from ``PALIGEMMA_SEGMENTATION_WEIGHTS``
(``--segmentation-weights``). Tests use :func:`write_random_weights`, same keys and shapes. torch is
imported only when a decoder is built, so ``import paligemma`` stays light.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from paligemma.tokens import NUM_SEG_TOKENS, SEG_TOKENS_PER_MASK

if TYPE_CHECKING:
    import torch

    from paligemma.parsing import Detection

WEIGHTS_URL = "gs://big_vision/paligemma/vae-oid.npz"
WEIGHTS_HTTPS_URL = "https://storage.googleapis.com/big_vision/paligemma/vae-oid.npz"
WEIGHTS_ENV = "PALIGEMMA_SEGMENTATION_WEIGHTS"
WEIGHTS_FLAG = "--segmentation-weights"
WEIGHTS_SHA256 = "5586010257b8536dddefab65e7755077f21d5672d5674dacf911f73ae95a4447"
"""Reported for the public file (from a git-LFS pointer); informative only, not checked on load."""

CODEBOOK_KEY = "_vq_vae._embedding"
MASK_SIZE = 64
GRID = 4  # 16 tokens = a 4x4 grid; four doublings give 64x64
DEFAULT_EMBEDDING_DIM = 512  # only for write_random_weights; a real file's D is read from it
TOKENS_PER_OBJECT = 22
"""Generation budget per object of a ``segment`` answer: 4 loc + 16 seg + a label token or two + ``" ;"``."""
TOKENS_MARGIN = 8


def answer_tokens(num_objects: int) -> int:
    """Tokens enough for a ``segment`` answer of ``num_objects`` objects (``/segment``'s budget rule)."""
    return TOKENS_PER_OBJECT * num_objects + TOKENS_MARGIN


_WIDTH = 128
_UPSAMPLE = (128, 128, 64, 32, 16)  # in/out channels of decoder.4, .6, .8, .10
_DOWNSAMPLE = (1, 16, 32, 64, 128)  # in/out channels of encoder.0, .2, .4, .6 (the decoder mirrored)
_DOWN_KERNEL = 4
"""4x4 stride-2 convs, as in the VQ-VAE big_vision's file comes from (SwinTransformer/AiT ``vae/models/VQVAE.py``);
with these shapes, D=512 and the two EMA buffers, ``np.savez`` writes exactly the public file's 8,479,556 bytes."""
_HOW_TO_GET = (
    f"Download big_vision's VAE weights ({WEIGHTS_URL}, i.e. {WEIGHTS_HTTPS_URL}) and set "
    f"{WEIGHTS_ENV}=/path/to/vae-oid.npz (or pass {WEIGHTS_FLAG} /path/to/vae-oid.npz)."
)

Box = tuple[float, float, float, float]


def weight_shapes(embedding_dim: int, num_codes: int = NUM_SEG_TOKENS) -> dict[str, tuple[int, ...]]:
    """Every key the decoder reads, with its shape in PyTorch layout (``encoder.*`` keys are ignored)."""
    shapes: dict[str, tuple[int, ...]] = {CODEBOOK_KEY: (num_codes, embedding_dim)}

    def conv(name: str, out: int, inp: int, k: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (out, inp, k, k), (out,)

    conv("decoder.0", _WIDTH, embedding_dim, 1)
    for block in ("decoder.2.net", "decoder.3.net"):
        conv(f"{block}.0", _WIDTH, _WIDTH, 3)
        conv(f"{block}.2", _WIDTH, _WIDTH, 3)
        conv(f"{block}.4", _WIDTH, _WIDTH, 1)
    for i, (inp, out) in enumerate(zip(_UPSAMPLE, _UPSAMPLE[1:], strict=False)):
        name = f"decoder.{4 + 2 * i}"  # ConvTranspose2d weights are [in, out, k, k]
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (inp, out, 4, 4), (out,)
    conv("decoder.12", 1, _UPSAMPLE[-1], 1)
    return shapes


def encoder_weight_shapes(embedding_dim: int, num_codes: int = NUM_SEG_TOKENS) -> dict[str, tuple[int, ...]]:
    """The ``encoder.*`` keys of ``vae-oid.npz`` and the EMA buffers, PyTorch layout ``[out, in, kh, kw]``."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name: str, out: int, inp: int, k: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (out, inp, k, k), (out,)

    for i, (inp, out) in enumerate(zip(_DOWNSAMPLE, _DOWNSAMPLE[1:], strict=False)):
        conv(f"encoder.{2 * i}", out, inp, _DOWN_KERNEL)
    for block in ("encoder.8.net", "encoder.9.net"):
        conv(f"{block}.0", _WIDTH, _WIDTH, 3)
        conv(f"{block}.2", _WIDTH, _WIDTH, 3)
        conv(f"{block}.4", _WIDTH, _WIDTH, 1)
    conv("encoder.10", embedding_dim, _WIDTH, 1)
    shapes["_vq_vae._ema_cluster_size"] = (num_codes,)
    shapes["_vq_vae._ema_w"] = (num_codes, embedding_dim)
    return shapes


def load_weights(path: str | os.PathLike[str] | None) -> dict[str, np.ndarray]:
    """Read and check the decoder's arrays from ``vae-oid.npz``.

    Raises ``ValueError`` when no path is configured or the file is not a valid weights file, and
    ``FileNotFoundError`` when the path does not exist; both messages say where to get the file.
    """
    if path is None or not str(path).strip():
        raise ValueError(f"segmentation decoder weights are not configured. {_HOW_TO_GET}")
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"segmentation decoder weights not found at {str(file)!r}. {_HOW_TO_GET}")
    try:
        with np.load(file, allow_pickle=False) as npz:
            arrays = {key: np.asarray(npz[key]) for key in npz.files if not key.startswith("encoder.")}
    except (OSError, ValueError) as exc:  # not a zip / npz
        raise ValueError(f"{str(file)!r} is not a valid .npz weights file ({exc}). {_HOW_TO_GET}") from exc
    check_weights(arrays, source=str(file))
    return arrays


def check_weights(arrays: Mapping[str, np.ndarray], source: str = "weights") -> None:
    """Raise ``ValueError`` naming the first missing key or wrong shape."""
    codebook = arrays.get(CODEBOOK_KEY)
    if codebook is None or codebook.ndim != 2:
        raise ValueError(f"{source}: missing a 2-D {CODEBOOK_KEY!r} codebook. {_HOW_TO_GET}")
    for key, shape in weight_shapes(codebook.shape[1], codebook.shape[0]).items():
        if key not in arrays:
            raise ValueError(f"{source}: missing key {key!r}. {_HOW_TO_GET}")
        if tuple(arrays[key].shape) != shape:
            raise ValueError(f"{source}: {key!r} has shape {tuple(arrays[key].shape)}, expected {shape}")


def write_random_weights(
    path: str | os.PathLike[str],
    *,
    embedding_dim: int = DEFAULT_EMBEDDING_DIM,
    num_codes: int = NUM_SEG_TOKENS,
    seed: int = 0,
    encoder: bool = False,
) -> Path:
    """Write randomly initialised weights in ``vae-oid.npz``'s key layout (for tests and demos).

    Uniform ``±1/sqrt(fan_in)`` like PyTorch's default init and a standard-normal codebook. Without
    ``encoder`` one ``encoder.*`` placeholder stands in, so loaders meet the real file's mix of keys; with it
    the file has every key of the real one (see :func:`encoder_weight_shapes`), its convs He-normal with
    biases in ±0.1: under the default init eleven layers shrink the mask's signal below the biases and every
    mask gets the same codeword. The decoder's arrays are the same for a seed either way (drawn first).
    """
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {} if encoder else {"encoder.0.weight": np.zeros((1,), np.float32)}
    shapes = weight_shapes(embedding_dim, num_codes)
    if encoder:
        shapes |= encoder_weight_shapes(embedding_dim, num_codes)
    for key, shape in shapes.items():
        if key == CODEBOOK_KEY or key.startswith("_vq_vae._ema"):
            arrays[key] = rng.standard_normal(shape).astype(np.float32)
        elif key.startswith("encoder."):
            he = np.sqrt(2 / int(np.prod(shape[1:])))
            draw = rng.uniform(-0.1, 0.1, shape) if key.endswith("bias") else rng.normal(0, he, shape)
            arrays[key] = draw.astype(np.float32)
        else:
            bound = 1.0 / np.sqrt(int(np.prod(shapes[key.rsplit(".", 1)[0] + ".weight"][1:])))
            arrays[key] = rng.uniform(-bound, bound, shape).astype(np.float32)
    out = Path(path)
    with out.open("wb") as f:  # a file object keeps np.savez from appending ".npz"
        np.savez(f, **arrays)  # type: ignore[arg-type]
    return out


def build_module(embedding_dim: int, num_codes: int = NUM_SEG_TOKENS) -> torch.nn.Module:
    """The decoder as an ``nn.Module`` whose ``state_dict`` keys are exactly the file's keys.

    Public so that ``finetune.recipes.mask_codebook`` trains this very module rather than a second copy of it.
    """
    import torch
    from torch import nn

    class ResBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(
                nn.Conv2d(_WIDTH, _WIDTH, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(_WIDTH, _WIDTH, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(_WIDTH, _WIDTH, 1),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.net(x)  # type: ignore[no-any-return]

    class Codebook(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self._embedding = nn.Parameter(torch.zeros(num_codes, embedding_dim))

    class VAEDecoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self._vq_vae = Codebook()
            layers: list[nn.Module] = [nn.Conv2d(embedding_dim, _WIDTH, 1), nn.ReLU(), ResBlock(), ResBlock()]
            for inp, out in zip(_UPSAMPLE, _UPSAMPLE[1:], strict=False):
                layers += [nn.ConvTranspose2d(inp, out, 4, stride=2, padding=1), nn.ReLU()]
            layers.append(nn.Conv2d(_UPSAMPLE[-1], 1, 1))
            self.decoder = nn.Sequential(*layers)

        def forward(self, indices: torch.Tensor) -> torch.Tensor:
            grid = self._vq_vae._embedding[indices].reshape(-1, GRID, GRID, embedding_dim)  # NHWC, row-major
            return self.decoder(grid.permute(0, 3, 1, 2))[:, 0]  # type: ignore[no-any-return]

    return VAEDecoder()


class MaskDecoder:
    """16 seg codewords -> 64x64 mask logits (> 0 is inside the object). Stateless after construction."""

    def __init__(self, weights: Mapping[str, np.ndarray]) -> None:
        import torch

        check_weights(weights)
        self.num_codes, self.embedding_dim = (int(n) for n in weights[CODEBOOK_KEY].shape)
        self.module = build_module(self.embedding_dim, self.num_codes)
        state = {key: torch.from_numpy(np.asarray(weights[key], dtype=np.float32)) for key in self.module.state_dict()}
        self.module.load_state_dict(state, strict=True)
        self.module.eval()

    @classmethod
    def from_npz(cls, path: str | os.PathLike[str] | None) -> MaskDecoder:
        """Load ``vae-oid.npz`` (see :func:`load_weights` for the errors)."""
        return cls(load_weights(path))

    def decode(self, seg_tokens: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
        """``[N, 16]`` codeword indices -> float32 logits ``[N, 64, 64]``; ``ValueError`` on bad indices."""
        import torch

        indices = np.asarray(seg_tokens, dtype=np.int64).reshape(-1, SEG_TOKENS_PER_MASK)
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_codes):
            raise ValueError(f"seg indices must be in [0, {self.num_codes}), got {indices.min()}..{indices.max()}")
        if not len(indices):
            return np.zeros((0, MASK_SIZE, MASK_SIZE), np.float32)
        with torch.inference_mode():
            logits = self.module(torch.from_numpy(indices))
        result: np.ndarray = logits.numpy().astype(np.float32, copy=False)
        return result


def pixel_box(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
    """The evaluator's integer box ``(x1, y1, x2, y2)``: ``int(v * side)``, clipped to the image.

    ``box`` is a :class:`~paligemma.parsing.Detection` pixel box, i.e. ``loc / LOC_MAX * side``.
    """
    x1, y1, x2, y2 = (int(v) for v in box)
    return (min(max(x1, 0), width), min(max(y1, 0), height), min(max(x2, 0), width), min(max(y2, 0), height))


def paste_mask(mask64: np.ndarray, box: Box, width: int, height: int) -> np.ndarray | None:
    """A 64x64 logit mask resized (bilinear) into the pixel ``box`` of a ``height x width`` bool mask.

    Returns None when the integer box is empty (the evaluator skips such masks).
    """
    from PIL import Image

    x1, y1, x2, y2 = pixel_box(box, width, height)
    if x2 <= x1 or y2 <= y1:
        return None
    logits = Image.fromarray(np.asarray(mask64, dtype=np.float32))  # mode "F"
    # Pillow's bilinear uses half-pixel centres and widens its kernel when shrinking, like big_vision's
    # jax.image.resize(..., "bilinear") with its default antialiasing.
    resized = np.asarray(logits.resize((x2 - x1, y2 - y1), Image.Resampling.BILINEAR))
    full = np.zeros((height, width), dtype=bool)
    full[y1:y2, x1:x2] = resized > 0.0
    return full


def attach_masks(detections: Iterable[Detection], decoder: MaskDecoder, width: int, height: int) -> list[Detection]:
    """Decode every detection that has 16 seg tokens (one batch) and set its ``mask``; returns the list.

    Detections without seg tokens, or whose box is empty in pixels, keep ``mask=None``.
    """
    detections = list(detections)
    with_tokens = [(det, det.seg_tokens) for det in detections if det.seg_tokens is not None]
    if with_tokens:
        logits = decoder.decode([tokens for _, tokens in with_tokens])
        for (det, _), mask64 in zip(with_tokens, logits, strict=True):
            det.mask = paste_mask(mask64, det.box, width, height)
    return detections
