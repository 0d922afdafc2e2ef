"""The CPU thread budget (service/engines/cpu_threads.py): the split, who wins, and that it is applied.

The split is pure arithmetic over the usable cores; applying it is checked for real: torch's thread count and
every thread's affinity in this process, restored after, and, in a real ``python -m service`` with the vLLM
engine, the worker's OpenMP thread and the API process on disjoint cores.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import httpx
import psutil
import pytest
import torch

from service.engines import cpu_threads
from service.engines.cpu_threads import (
    CpuBudget,
    cpu_budget,
    lower_this_thread,
    pinned,
    scoped_environ,
    torch_threads,
    vllm_cpu_environ,
)
from service.model_input import WORKER_NICE
from service.settings import Settings
from tests.reliability.server import ServiceProcess


def budget(
    cores: int, monkeypatch: pytest.MonkeyPatch, env: dict[str, str] | None = None, **fields: object
) -> CpuBudget:
    monkeypatch.setattr(cpu_threads, "usable_cores", lambda: tuple(range(cores)))
    return cpu_budget(Settings(model="m", **fields), environ=env or {})  # type: ignore[arg-type]


def test_auto_leaves_the_decode_pool_and_the_event_loop_their_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    assert budget(16, monkeypatch).model_threads == 16 - 2 - 1
    assert budget(16, monkeypatch, decode_workers=4).model_threads == 11
    assert budget(2, monkeypatch).model_threads == 1  # at least one
    assert budget(1, monkeypatch).model_threads == 1
    split = budget(8, monkeypatch)
    assert (split.model_cpus, split.api_cpus, split.source) == ((0, 1, 2, 3, 4), (5, 6, 7), "auto")


def test_explicit_choices_win(monkeypatch: pytest.MonkeyPatch) -> None:
    omp = budget(16, monkeypatch, env={"OMP_NUM_THREADS": "4"})
    assert (omp.model_threads, omp.source) == (4, "OMP_NUM_THREADS")
    setting = budget(16, monkeypatch, env={"OMP_NUM_THREADS": "4"}, torch_threads=6)
    assert (setting.model_threads, setting.source) == (6, "torch_threads")
    assert budget(4, monkeypatch, torch_threads=64).model_threads == 4  # never more than the cores
    assert budget(16, monkeypatch, env={"OMP_NUM_THREADS": "junk"}).source == "auto"
    whole = budget(4, monkeypatch, torch_threads=4)
    assert whole.api_cpus == whole.cores  # nothing left: the API process shares them


def _nice(tid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid)


def test_lower_this_thread_moves_that_thread_and_what_it_starts_only() -> None:
    """Linux keeps nice per thread: the model's thread goes down, the event loop's stays where it was."""
    main = _nice(threading.get_native_id())
    seen: dict[str, int] = {}

    def model_thread() -> None:
        lower_this_thread(5)
        seen["model"] = _nice(threading.get_native_id())
        child = threading.Thread(target=lambda: seen.__setitem__("started by it", _nice(threading.get_native_id())))
        child.start()
        child.join()

    thread = threading.Thread(target=model_thread)
    thread.start()
    thread.join()
    assert seen == {"model": min(19, main + 5), "started by it": min(19, main + 5)}
    assert _nice(threading.get_native_id()) == main


def test_setting_from_the_environment() -> None:
    assert Settings(model="m").torch_threads == "auto"
    os.environ["PALIGEMMA_TORCH_THREADS"] = "3"
    try:
        assert Settings(model="m").torch_threads == 3
    finally:
        del os.environ["PALIGEMMA_TORCH_THREADS"]
    with pytest.raises(ValueError):
        Settings(model="m", torch_threads=0)


def test_vllm_variables_are_the_budgets_unless_the_user_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    split = budget(8, monkeypatch)
    ours = {"VLLM_CPU_OMP_THREADS_BIND": "0,1,2,3,4", "VLLM_V1_OUTPUT_PROC_CHUNK_SIZE": "1"}
    assert vllm_cpu_environ(split, environ={}) == ours
    assert vllm_cpu_environ(split, environ={"VLLM_CPU_OMP_THREADS_BIND": "2-3"}) == {
        "VLLM_V1_OUTPUT_PROC_CHUNK_SIZE": "1"
    }
    assert vllm_cpu_environ(split, environ={"VLLM_V1_OUTPUT_PROC_CHUNK_SIZE": "64"}) == {
        "VLLM_CPU_OMP_THREADS_BIND": "0,1,2,3,4"
    }


def test_scoped_environ_leaves_nothing_behind() -> None:
    assert "PALIGEMMA_TEST_SCOPED" not in os.environ
    with scoped_environ({"PALIGEMMA_TEST_SCOPED": "1"}):
        assert os.environ["PALIGEMMA_TEST_SCOPED"] == "1"
    assert "PALIGEMMA_TEST_SCOPED" not in os.environ


def test_torch_threads_applies_and_restores() -> None:
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def _affinities() -> set[tuple[int, ...]]:
    return {tuple(sorted(os.sched_getaffinity(int(task)))) for task in os.listdir("/proc/self/task")}


def test_pinned_moves_every_thread_and_restores() -> None:
    cores = tuple(sorted(os.sched_getaffinity(0)))
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        with pinned(cores[-1:]):
            assert _affinities() == {cores[-1:]}
        assert _affinities() == {cores}
    finally:
        stop.set()
        other.join()


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="a split needs two cores")
def test_vllm_worker_and_api_process_get_disjoint_cores(tiny_checkpoint: Path) -> None:
    settings = {"engine": "vllm", "max_model_len": 256, "enforce_eager": "true", "kv_cache_gib": 1, "log_level": "info"}
    with ServiceProcess(tiny_checkpoint, **settings) as server:
        api = psutil.Process(server.process.pid)
        api_cpus = {cpu for thread in api.threads() for cpu in os.sched_getaffinity(thread.id)}
        # vLLM's worker, the process whose OpenMP threads run the model (forked, so named by its title)
        workers = [p for p in api.children(recursive=True) if p.name() == "VLLM::Worker"]
        bound = {cpu for p in workers for thread in p.threads() for cpu in os.sched_getaffinity(thread.id)}
        assert workers and bound and api_cpus, server.log()[-3000:]
        assert not bound & api_cpus, f"worker on {sorted(bound)}, API process on {sorted(api_cpus)}"
        assert "CPU threads: model" in server.log()
        # and below the API process: its engine core and worker, every thread, at nice +10; the upload
        # workers (multiprocessing's spawned children, started once the engine is up) on the API's cores,
        # between the two (service.model_input.WORKER_NICE)
        main = _nice(api.pid)
        children = api.children(recursive=True)
        uploads = [p for p in children if "spawn_main" in " ".join(p.cmdline())]
        model = [p for p in children if p not in uploads]
        below = {_nice(thread.id) for p in model for thread in p.threads()}
        assert below == {main + 10} and _nice(api.pid) == main, server.log()[-3000:]
        assert len(uploads) >= 2 and {_nice(p.pid) for p in uploads} == {main + WORKER_NICE}
        assert set().union(*(os.sched_getaffinity(p.pid) for p in uploads)) <= api_cpus


def test_transformers_model_thread_runs_below_the_event_loop(tiny_checkpoint: Path, png: bytes) -> None:
    with ServiceProcess(tiny_checkpoint, log_level="info") as server:
        response = httpx.post(f"{server.url}/caption", files={"image": ("x.png", png, "image/png")}, timeout=60)
        assert response.status_code == 200, response.text
        api = psutil.Process(server.process.pid)
        nice = sorted(_nice(thread.id) for thread in api.threads())
        main = _nice(api.pid)
        assert nice.count(main + 10) == 1 and nice.count(main) == len(nice) - 1, nice  # hf-generate alone
        assert "at nice +10" in server.log()
    with ServiceProcess(tiny_checkpoint, model_nice=0) as server:
        httpx.post(f"{server.url}/caption", files={"image": ("x.png", png, "image/png")}, timeout=60)
        assert {_nice(thread.id) for thread in psutil.Process(server.process.pid).threads()} == {main}
