"""Bool masks to JSON: COCO run-length encoding (pycocotools) and optional polygons (OpenCV).

The JSON shape of one mask in the API (``detections[i].mask``)::

    {
      "rle": {"size": [H, W], "counts": "<COCO compressed RLE string>"},
      "area": 1234,
      "polygons": [[x1, y1, x2, y2, ...], ...]
    }

- ``rle`` is exactly what ``pycocotools.mask.encode`` returns for the full-image mask (column-major runs,
  starting with background), with ``counts`` as text, so ``pycocotools.mask.decode(rle)`` (or
  ``{"size": ..., "counts": counts.encode()}`` on older versions) gives the ``H x W`` mask back.
  ``size`` is ``[height, width]`` of the image the boxes refer to.
- ``area`` is the number of mask pixels.
- ``polygons`` (only when asked for) are the outer boundaries of the mask's connected parts
  (``cv2.findContours``, external contours, ``CHAIN_APPROX_SIMPLE``), each a flat ``[x, y, ...]`` list of
  integer pixel coordinates (x right, y down); holes are not represented and parts with fewer than 3
  points are dropped. Use ``rle`` when exactness matters.

pycocotools and OpenCV (``opencv-python-headless``) are the ``serve`` extra's and are imported when called.
"""

from __future__ import annotations

import warnings
from typing import Any, TypedDict

import numpy as np


class RLE(TypedDict):
    """COCO compressed RLE with text counts."""

    size: list[int]
    counts: str


def encode_rle(mask: np.ndarray) -> RLE:
    """``H x W`` bool mask -> COCO compressed RLE ``{"size": [H, W], "counts": str}``."""
    from pycocotools import mask as coco_mask

    array = _as_bool_2d(mask)
    rle = coco_mask.encode(np.asfortranarray(array.astype(np.uint8)))
    return {"size": [int(array.shape[0]), int(array.shape[1])], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: RLE) -> np.ndarray:
    """COCO RLE (text or bytes counts) -> ``H x W`` bool mask."""
    from pycocotools import mask as coco_mask

    counts: Any = rle["counts"]
    encoded = {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    with warnings.catch_warnings():  # pycocotools 2.0.x's decode trips numpy 2's __array__(copy=) deprecation
        warnings.filterwarnings("ignore", message="__array__ implementation", category=DeprecationWarning)
        return np.asarray(coco_mask.decode(encoded), dtype=bool)


def mask_polygons(mask: np.ndarray) -> list[list[int]]:
    """Outer boundaries of the mask's parts as flat ``[x1, y1, x2, y2, ...]`` pixel lists."""
    import cv2

    array = np.ascontiguousarray(_as_bool_2d(mask), dtype=np.uint8)
    contours, _ = cv2.findContours(array, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [[int(v) for v in contour.reshape(-1)] for contour in contours if len(contour) >= 3]


def mask_to_json(mask: np.ndarray, *, polygons: bool = False) -> dict[str, Any]:
    """The API's mask object (see the module docstring): ``rle``, ``area`` and, if asked, ``polygons``."""
    array = _as_bool_2d(mask)
    result: dict[str, Any] = {"rle": encode_rle(array), "area": int(array.sum())}
    if polygons:
        result["polygons"] = mask_polygons(array)
    return result


def _as_bool_2d(mask: np.ndarray) -> np.ndarray:
    array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"a mask must be 2-D (H x W), got shape {array.shape}")
    return array.astype(bool, copy=False)
