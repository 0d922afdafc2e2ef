"""The CPU thread budget: how many cores the model's threads get, and which, so they stop fighting the rest.

On a CPU host the model's OpenMP threads, the image-decode pool, the event loop and JSON work share the
cores. torch's default (one intra-op thread per core) spins against the others: measured on 2 cores,
throughput fell past saturation (c=32 below c=16) and ``/healthz`` slowed to 35-40 ms. The budget gives the
model ``usable cores - decode workers - 1`` threads (at least 1) and leaves the rest to the API process and
its image workers.

- transformers engine: ``torch.set_num_threads`` in this process (:func:`torch_threads`).
- vLLM engine on CPU: the model runs in vLLM's worker process, whose OpenMP threads vLLM binds to
  ``VLLM_CPU_OMP_THREADS_BIND``; the budget sets it to the first cores and, once the engine is up, pins the
  API process's threads to the others (:func:`pinned`), so the two get disjoint cores. The one API core
  also serves responses in turns with probes: vLLM hands over one output per event-loop turn.

A user's choice wins: ``torch_threads`` set to a number, else an explicit ``OMP_NUM_THREADS``, else ``auto``;
a ``VLLM_CPU_OMP_THREADS_BIND`` or ``VLLM_V1_OUTPUT_PROC_CHUNK_SIZE`` already in the environment is left
as it is.

Disjoint cores are not enough where the API process still shares a core (with the load balancer, vLLM's
engine core, a sidecar): the model's threads also run ``model_nice`` levels below it (Linux keeps a nice
value per thread), so a probe or a request being parsed takes the core at once and the model gets every
cycle left over (figures in docs/performance.md).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CpuBudget:
    cores: tuple[int, ...]
    """The CPUs this process may run on (its affinity mask)."""
    model_threads: int
    source: str
    """What chose ``model_threads``: ``torch_threads``, ``OMP_NUM_THREADS`` or ``auto``."""
    model_nice: int = 0
    """How many nice levels below the API process the model's threads run."""

    @property
    def model_cpus(self) -> tuple[int, ...]:
        return self.cores[: self.model_threads]

    @property
    def api_cpus(self) -> tuple[int, ...]:
        """The cores left to the API process (all of them when the model takes every core)."""
        return self.cores[self.model_threads :] or self.cores

    def describe(self) -> str:
        return (
            f"CPU threads: model {self.model_threads} ({self.source}) at nice +{self.model_nice}, API process and "
            f"{len(self.api_cpus)} core(s) left of {len(self.cores)} usable"
        )


def usable_cores() -> tuple[int, ...]:
    return (
        tuple(sorted(os.sched_getaffinity(0)))
        if hasattr(os, "sched_getaffinity")
        else tuple(range(os.cpu_count() or 1))
    )


def decode_workers(settings: Settings, on_gpu: bool) -> int:
    """How many processes decode uploads (``decode_workers``; ``auto``: 2 beside a CPU model, which needs the
    cores; beside a GPU model half the usable cores, 2 to 8, since uploads are then the CPU work)."""
    if settings.decode_workers != "auto":
        return settings.decode_workers
    return min(8, max(2, len(usable_cores()) // 2)) if on_gpu else 2


def cpu_budget(settings: Settings, environ: dict[str, str] | None = None) -> CpuBudget:
    """The split for ``settings`` on this machine (``environ``: os.environ unless given)."""
    env = os.environ if environ is None else environ
    cores = usable_cores()
    if settings.torch_threads != "auto":
        threads, source = settings.torch_threads, "torch_threads"
    elif env.get("OMP_NUM_THREADS", "").strip().isdigit() and int(env["OMP_NUM_THREADS"]) > 0:
        threads, source = int(env["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    else:
        threads, source = len(cores) - decode_workers(settings, on_gpu=False) - 1, "auto"
    return CpuBudget(cores, max(1, min(threads, len(cores))), source, settings.model_nice)


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads in this process while an engine runs, restored after (tests run several)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


BIND = "VLLM_CPU_OMP_THREADS_BIND"
OUTPUT_CHUNK = "VLLM_V1_OUTPUT_PROC_CHUNK_SIZE"


def vllm_cpu_environ(budget: CpuBudget, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables vLLM reads at start-up that the budget sets on a CPU host, each unless the user set it.

    - ``VLLM_CPU_OMP_THREADS_BIND``: the worker's OpenMP threads on the model's cores.
    - ``VLLM_V1_OUTPUT_PROC_CHUNK_SIZE=1``: vLLM's output handler hands the event loop one request's output
      per turn instead of up to 128. Requests that finish in the same engine step otherwise all resume in one
      turn, and a probe waits behind every one of their responses (``/healthz`` p90 at c=32 halved).
    """
    env = os.environ if environ is None else environ
    ours = {BIND: ",".join(str(cpu) for cpu in budget.model_cpus), OUTPUT_CHUNK: "1"}
    return {key: value for key, value in ours.items() if key not in env}


@contextmanager
def scoped_environ(values: dict[str, str]) -> Iterator[None]:
    """``values`` in ``os.environ`` for the block only (what a child process started in it inherits)."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def pinned(cpus: tuple[int, ...]) -> Iterator[None]:
    """Every thread of this process on ``cpus`` (threads started meanwhile inherit it), restored after."""
    if not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = tuple(os.sched_getaffinity(0))
    _pin_all(cpus)
    try:
        yield
    finally:
        _pin_all(before)


def _pin_all(cpus: tuple[int, ...]) -> None:
    """Pass over the threads until none is left off ``cpus``: one started during a pass by a thread not yet
    pinned would inherit the old mask."""
    for _ in range(10):
        moved = 0
        for task in os.listdir("/proc/self/task"):
            try:
                if os.sched_getaffinity(int(task)) != set(cpus):
                    os.sched_setaffinity(int(task), cpus)
                    moved += 1
            except OSError:  # a thread that ended meanwhile
                continue
        if not moved:
            return


def lower_this_thread(levels: int) -> None:
    """This thread, and the threads it starts from now on (torch's OpenMP pool), ``levels`` nice levels
    below the main thread. Only ever lowers: never needs privileges."""
    _lower(threading.get_native_id(), levels)


def settle_descendants(budget: CpuBudget, confine: bool) -> int:
    """Every thread of this process's child processes (vLLM's engine core and worker) ``budget.model_nice``
    levels below the main thread and, with ``confine``, on the model's cores: the engine core would otherwise
    spin on the API process's core. Threads vLLM bound to single model cores keep their binding. Returns how
    many threads there were."""
    import psutil  # a vLLM dependency; only the vLLM engine calls this

    model_cpus = set(budget.model_cpus)
    count = 0
    for child in psutil.Process().children(recursive=True):
        try:
            threads = child.threads()
        except psutil.Error:  # ended meanwhile
            continue
        for thread in threads:
            _lower(thread.id, budget.model_nice)
            try:
                if confine and not os.sched_getaffinity(thread.id) <= model_cpus:
                    os.sched_setaffinity(thread.id, model_cpus)
            except OSError:  # a thread that ended meanwhile
                continue
            count += 1
    return count


def _lower(tid: int, levels: int) -> None:
    target = min(19, os.getpriority(os.PRIO_PROCESS, os.getpid()) + levels)
    try:
        if levels > 0 and os.getpriority(os.PRIO_PROCESS, tid) < target:
            os.setpriority(os.PRIO_PROCESS, tid, target)
    except OSError:  # a thread that ended meanwhile
        pass
