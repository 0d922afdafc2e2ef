"""Lets PyPI's CUDA-built torchvision import beside the CPU build of torch.

PyPI's ``torchvision`` is compiled against CUDA torch; beside ``torch==2.13.0+cpu`` its C++ ops do not
load and ``import torchvision`` fails with "operator torchvision::nms does not exist". vLLM's PaliGemma
path imports it (through a transformers image processor), in every process it spawns. ``make setup``
copies this file into the CPU venv's site-packages with a ``.pth`` line only when that failure is seen;
it declares the two missing op schemas just before torchvision is first imported. Users who install
torchvision from PyTorch's CPU index never need it.
"""

import importlib.abc
import sys


class _DeclareTorchvisionOps(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):  # type: ignore[no-untyped-def]
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch

        lib = torch.library.Library("torchvision", "DEF")  # noqa: F841 - must stay alive
        for op in ("nms", "qnms"):
            try:
                lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            except RuntimeError:
                pass
        _LIBS.append(lib)
        return None


_LIBS: list[object] = []
sys.meta_path.insert(0, _DeclareTorchvisionOps())
