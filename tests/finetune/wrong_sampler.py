"""``python -m finetune`` whose training sampler is seeded per rank: the classic data-parallel bug (each rank
shuffles on its own, so a global step trains some examples twice and skips others). The DDP test runs it
to show that its tolerance tells a correct run from this one.

    torchrun --standalone --nproc_per_node 2 -m tests.finetune.wrong_sampler train --base ... --out ...
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any


def main(argv: list[str]) -> None:
    import torch
    from torch.utils.data import Sampler
    from transformers import Trainer

    class PerRankShuffle(Sampler[int]):
        """A shuffle seeded by the rank (not a ``RandomSampler``, which accelerate would reseed for all ranks)."""

        def __init__(self, size: int) -> None:
            self.size, self.seed = size, int(os.environ.get("RANK", "0"))

        def __iter__(self) -> Iterator[int]:
            return iter(torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed)).tolist())

        def __len__(self) -> int:
            return self.size

    def sampler(self: Trainer, *args: Any, **kwargs: Any) -> PerRankShuffle:
        return PerRankShuffle(len(self.train_dataset))  # type: ignore[arg-type]

    Trainer._get_train_sampler = sampler  # type: ignore[method-assign]
    from finetune.__main__ import main as finetune_main

    finetune_main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
