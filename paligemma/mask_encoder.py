"""Masks to PaliGemma's 16 ``<segNNN>`` codewords: big_vision's VQ-VAE encoder, in PyTorch.

The inverse of :mod:`paligemma.segmentation`, and what makes segmentation *training targets*. It follows
big_vision ``big_vision/pp/proj/paligemma/segmentation.py`` (op ``refcoco_mask2str`` and
``encode_to_codebook_indices``), which is TensorFlow::

    binary mask [H, W] + box -> crop [round(H*y1):round(H*y2), round(W*x1):round(W*x2)]
        -> 64x64 bilinear, antialiased -> [0, 1] -> 2x - 1 -> encoder -> 4x4xD -> nearest codeword each

The encoder (keys of ``vae-oid.npz``, PyTorch layout; every shape is read from the file):

==========================  ============================================================  ========
key                         layer                                                         shape
==========================  ============================================================  ========
``encoder.0/2/4/6``         conv, stride 2, + ReLU (real file: 4x4; out 16, 32, 64, 128)  4x4x128
``encoder.8/9.net.0/2/4``   ResBlock: conv3x3, ReLU, conv3x3, ReLU, conv1x1, + skip       4x4x128
``encoder.10``              conv 1x1 -> D                                                 4x4xD
``_vq_vae._embedding``      nearest of the 128 codewords (expanded squared distance)      16 ids
==========================  ============================================================  ========

The real file's down-sampling kernels are 4x4, not 3x3 (inferred, the file is not available here): these
shapes plus the EMA buffers give exactly its published byte size, and they are the encoder of the VQ-VAE
big_vision cites (arXiv 2301.02229; SwinTransformer/AiT ``vae/models/VQVAE.py``, insseg config).

Every conv pads like TensorFlow's ``padding='SAME'`` (extra padding after, never before), so a 3x3 stride-2
file would still match big_vision; for the file's 4x4 kernels it equals PyTorch's ``padding=1``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from paligemma.segmentation import CODEBOOK_KEY, GRID, MASK_SIZE, encoder_weight_shapes, load_weights
from paligemma.tokens import SEG_TOKENS, SEG_TOKENS_PER_MASK

if TYPE_CHECKING:
    import torch

_DOWN = ("encoder.0", "encoder.2", "encoder.4", "encoder.6")
_BLOCKS = ("encoder.8.net", "encoder.9.net")


def build_module(shapes: Mapping[str, Sequence[int]]) -> torch.nn.Module:
    """The encoder as an ``nn.Module`` whose ``state_dict`` keys are the file's ``encoder.*`` keys.

    ``shapes`` maps each ``encoder.*.weight`` key to its ``[out, in, kh, kw]`` (a file's arrays' shapes, or
    :func:`~paligemma.segmentation.encoder_weight_shapes`): public so ``finetune.recipes.mask_codebook`` trains it.
    """
    from torch import nn

    class SameConv(nn.Conv2d):
        """A conv padded like TF ``SAME``: the total ``(out-1)*s + k - in`` split with the extra after."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            pads: list[int] = []
            for size, k, s in zip(x.shape[:1:-1], self.kernel_size[::-1], self.stride[::-1], strict=True):
                total = max((-(-size // s) - 1) * s + k - size, 0)
                pads += [total // 2, total - total // 2]
            return nn.functional.conv2d(nn.functional.pad(x, pads), self.weight, self.bias, self.stride)

    def conv(name: str, stride: int = 1) -> SameConv:
        out, inp, kh, kw = shapes[f"{name}.weight"]
        return SameConv(inp, out, (kh, kw), stride=stride)

    class ResBlock(nn.Module):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.net = nn.Sequential(conv(f"{name}.0"), nn.ReLU(), conv(f"{name}.2"), nn.ReLU(), conv(f"{name}.4"))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.net(x)  # type: ignore[no-any-return]

    class VAEEncoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layers: list[nn.Module] = []
            for name in _DOWN:
                layers += [conv(name, stride=2), nn.ReLU()]
            layers += [ResBlock(name) for name in _BLOCKS] + [conv("encoder.10")]
            self.encoder = nn.Sequential(*layers)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.encoder(x)  # type: ignore[no-any-return]

    return VAEEncoder()


class MaskEncoder:
    """64x64 masks in [0, 1] -> ``[N, 16]`` codeword indices. Stateless after construction."""

    def __init__(self, weights: Mapping[str, np.ndarray]) -> None:
        import torch

        codebook = np.asarray(weights[CODEBOOK_KEY], dtype=np.float32)
        missing = [key for key in encoder_weight_shapes(codebook.shape[1]) if key.startswith("encoder.")]
        missing = [key for key in missing if key not in weights]
        if missing:
            raise ValueError(f"weights have no encoder (missing {missing[0]!r}); use the full vae-oid.npz")
        self.module = build_module({key: np.shape(value) for key, value in weights.items()})
        state = {key: torch.from_numpy(np.asarray(weights[key], dtype=np.float32)) for key in self.module.state_dict()}
        self.module.load_state_dict(state, strict=True)  # a wrong shape in the file fails here, by key
        self.module.eval()
        self.codebook = torch.from_numpy(codebook)

    @classmethod
    def from_npz(cls, path: str | os.PathLike[str] | None) -> MaskEncoder:
        """Load ``vae-oid.npz`` (the decoder's checks and errors, then the encoder's keys)."""
        arrays = load_weights(path)  # same errors as the decoder's, saying where to get the file
        with np.load(Path(str(path)).expanduser(), allow_pickle=False) as npz:
            arrays |= {key: np.asarray(npz[key]) for key in npz.files if key.startswith("encoder.")}
        return cls(arrays)

    def encode(self, masks: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """``[N, 64, 64]`` values in [0, 1] -> int64 ``[N, 16]``, row-major over the 4x4 grid."""
        import torch

        x = np.asarray(masks, dtype=np.float32).reshape(-1, 1, MASK_SIZE, MASK_SIZE)
        if not len(x):
            return np.zeros((0, SEG_TOKENS_PER_MASK), np.int64)
        with torch.inference_mode():
            z = self.module(torch.from_numpy(2.0 * (x - 0.5)))  # big_vision's _norm
            flat = z.permute(0, 2, 3, 1).reshape(-1, self.codebook.shape[1])  # NHWC rows, as TF reshapes them
            # The expanded squared distance big_vision's _get_codebook_indices computes; argmin keeps the first tie.
            distances = (flat**2).sum(1, keepdim=True) + (self.codebook**2).sum(1) - 2 * flat @ self.codebook.T
            indices = distances.argmin(1).reshape(-1, GRID * GRID)
        result: np.ndarray = indices.numpy().astype(np.int64)
        return result

    def encode_mask(self, mask: np.ndarray, box: tuple[float, float, float, float]) -> str:
        """One object's 16 ``<segNNN>`` tokens: ``mask`` (``[H, W]``, nonzero inside) cropped to pixel ``box``."""
        indices = self.encode(crop_resize(mask, box)[None])[0]
        return "".join(SEG_TOKENS[i] for i in indices)


def crop_box(box: tuple[float, float, float, float], width: int, height: int) -> tuple[int, int, int, int]:
    """Pixel ``(x1, y1, x2, y2)`` -> big_vision's integer crop ``(y1, x1, y2, x2)``.

    big_vision holds the box normalised in float32 and crops at ``tf.round(side * v)`` (half to even); the
    same arithmetic here, with ``v`` clipped to [0, 1] so a box past the edge crops at the edge.
    """
    x1, y1, x2, y2 = box
    normalised = np.clip(np.array([y1 / height, x1 / width, y2 / height, x2 / width], np.float32), 0, 1)
    sides = np.array([height, width, height, width], np.float32)
    top, left, bottom, right = (int(v) for v in np.rint(sides * normalised))
    return top, left, bottom, right


def crop_resize(mask: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """``[H, W]`` mask (nonzero inside) + pixel box -> float32 ``[64, 64]`` in [0, 1], as ``refcoco_mask2str``.

    Raises ``ValueError`` when the box covers no pixel.
    """
    import torch

    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D [H, W], got shape {mask.shape}")
    top, left, bottom, right = crop_box(box, width=mask.shape[1], height=mask.shape[0])
    if bottom <= top or right <= left:
        raise ValueError(f"box {box} covers no pixel of a {mask.shape[1]}x{mask.shape[0]} mask")
    crop = np.where(mask[top:bottom, left:right] != 0, np.float32(255), np.float32(0))  # big_vision's uint8 0/255
    resized = torch.nn.functional.interpolate(
        torch.from_numpy(crop)[None, None], size=(MASK_SIZE, MASK_SIZE), mode="bilinear", antialias=True
    )
    return (resized[0, 0].numpy() / np.float32(255)).astype(np.float32)
