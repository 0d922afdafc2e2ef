"""What ``--dtype auto`` (serving) and ``--precision auto`` (training) mean, in one place.

- A GPU: bfloat16 (PaliGemma 2 is unstable in float16; the released checkpoints are bfloat16).
- A CPU: the checkpoint's own dtype when it is bfloat16 and the CPU has native bfloat16 arithmetic
  (x86 ``avx512_bf16`` or ``amx_bf16``, ARM ``bf16``), else float32. A real-size checkpoint (bfloat16, as
  released and as ``python -m finetune random-like`` writes it) then takes half the memory of float32:
  5.6 instead of 11.3 GiB of weights for PaliGemma 2 3B.

Native only, because torch's bfloat16 kernels on a CPU without it are not a smaller float32, they are a
slower one: measured on the project's AVX2 machine (2 threads, a 256 x 2304 by 2304 x 9216 product), float32
ran the forward, input-gradient and weight-gradient products at 31 GFLOP/s each, bfloat16 at 7.3, 0.1 and
2.5. A LoRA step, whose gradients flow through every frozen layer, took over ten minutes instead of seconds.
The project's tiny and demo models are stored in float32 and keep it everywhere.

Every caller logs the returned reason next to the dtype, so a user sees why a run is in which dtype.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
"""``/proc/cpuinfo`` flags (x86 ``flags``, ARM ``Features``) of CPUs with bfloat16 arithmetic."""


def checkpoint_dtype(model: str) -> str | None:
    """The dtype a checkpoint directory's ``config.json`` records (``dtype`` or the older ``torch_dtype``)."""
    config_file = Path(model) / "config.json"
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text())
    text = config.get("text_config") or {}
    for source in (config, text):
        for key in ("dtype", "torch_dtype"):
            if isinstance(source.get(key), str):
                return str(source[key])
    return None


def cpu_bf16_flags(cpuinfo: str | None = None) -> set[str]:
    """The native bfloat16 flags this CPU reports (empty: none, or no ``/proc/cpuinfo`` to read)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text(errors="replace") if path.is_file() else ""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags |= set(value.split()) & NATIVE_BF16_FLAGS
    return flags


def auto_dtype(model: str, device: str) -> tuple[str, str]:
    """``(dtype, why)`` for ``auto`` on ``device`` (``cuda``, ``mps`` or ``cpu``) and the checkpoint ``model``."""
    if device != "cpu":
        return "bfloat16", f"on {device}"
    stored = checkpoint_dtype(model)
    if stored != "bfloat16":
        return "float32", f"on the CPU, for a checkpoint stored in {stored or 'an unknown dtype'}"
    native = cpu_bf16_flags()
    if not native:
        return "float32", (
            f"the checkpoint is bfloat16, but this CPU ({platform.machine()}) has no native bfloat16 "
            "(avx512_bf16, amx_bf16 or bf16), where torch's bfloat16 kernels are many times slower than float32"
        )
    return "bfloat16", f"the checkpoint is stored in bfloat16 and this CPU has {', '.join(sorted(native))}"
