"""``python -m finetune`` that kills itself with SIGKILL at a chosen moment, for the ``--resume`` tests.

    python -m tests.finetune.interrupt step:10 train --base ... --out ...
    python -m tests.finetune.interrupt save:8 train --base ... --out ...

``step:N``: in the middle of optimiser step N, after its forward and backward and before the update.
``save:N``: while ``checkpoint-N`` is being written, with half of its ``optimizer.pt`` on disk.
The kill is the real signal (nothing is cleaned up, no handler runs); only where it lands is chosen here,
so the tests do not depend on timing.
"""

from __future__ import annotations

import io
import os
import signal
import sys
from pathlib import Path
from typing import Any


def _kill() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _mid_step(step: int) -> None:
    from transformers import Trainer

    original = Trainer.training_step

    def training_step(self: Trainer, *args: Any, **kwargs: Any) -> Any:
        loss = original(self, *args, **kwargs)
        if self.state.global_step + 1 == step:  # global_step counts the steps already finished
            _kill()
        return loss

    Trainer.training_step = training_step  # type: ignore[method-assign]


def _mid_save(step: int) -> None:
    import torch

    original = torch.save
    target = Path(f"checkpoint-{step}") / "optimizer.pt"

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(f, str | os.PathLike) and Path(f).parts[-2:] == target.parts:
            buffer = io.BytesIO()
            original(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            with open(f, "wb") as fh:
                fh.write(data[: len(data) // 2])
            _kill()
        original(obj, f, *args, **kwargs)

    torch.save = save


def main(argv: list[str]) -> None:
    where, _, number = argv[0].partition(":")
    {"step": _mid_step, "save": _mid_save}[where](int(number))
    from finetune.__main__ import main as finetune_main

    finetune_main(argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
