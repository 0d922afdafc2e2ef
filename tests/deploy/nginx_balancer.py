"""Debian's nginx with the shipped balancer config in front of real ``python -m service`` replicas.

:func:`balancer_config` rewrites only what must change to run on loopback: the ``server`` line of the
upstream (one line per local replica) and the ``listen`` port; everything else is
``deploy/nginx/paligemma-lb.conf`` as shipped, so the test checks that file. :func:`closed_loop` drives
a steady load and records every answer. Used by ``tests/deploy/test_nginx_failover.py`` and
``benchmarks/failover.py``.
"""

from __future__ import annotations

import getpass
import os
import re
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.demo_model import heldout_image
from tests.reliability.server import ServiceProcess, free_port

SHIPPED = Path(__file__).resolve().parents[2] / "deploy" / "nginx" / "paligemma-lb.conf"
OBJECTS = "circle ; square ; triangle"
REPLICA = {"max_concurrent_requests": 2, "max_queued_requests": 2, "drain_timeout_s": 10, "max_new_tokens": 64}
"""Two slots and two queue places per replica, so that overloading all of them is reachable in a test."""


def balancer_config(shipped: str, replica_ports: Sequence[int], listen_port: int) -> str:
    """The shipped config with its upstream pointed at local replicas and its ``listen`` at ``listen_port``."""
    line = re.search(r"^\s*server paligemma-replicas:8000(?P<params>[^;]*);$", shipped, flags=re.M)
    params = line.group("params") if line else ""
    servers = "\n".join(f"    server 127.0.0.1:{port}{params};" for port in replica_ports)
    config, upstreams = re.subn(r"^\s*server paligemma-replicas:8000[^;]*;$", servers, shipped, flags=re.M)
    config, listens = re.subn(r"^(\s*)listen 8000;$", rf"\1listen 127.0.0.1:{listen_port};", config, flags=re.M)
    if (upstreams, listens) != (1, 1):
        raise ValueError("the shipped nginx config no longer has one upstream server line and one listen line")
    return config


class Nginx:
    """``nginx -g 'daemon off;'`` with a generated main config that includes the balancer config."""

    def __init__(self, replica_ports: Sequence[int]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix="nginx-"))
        (self.dir / "balancer.conf").write_text(balancer_config(SHIPPED.read_text(), replica_ports, self.port))
        temp = "\n".join(
            f"    {kind}_temp_path {self.dir}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        user = f"user {getpass.getuser()};" if os.geteuid() == 0 else ""
        (self.dir / "nginx.conf").write_text(
            f"{user}\nworker_processes 1;\npid {self.dir}/nginx.pid;\nerror_log {self.dir}/error.log warn;\n"
            f"events {{ worker_connections 512; }}\n"
            f"http {{\n    access_log off;\n{temp}\n    include {self.dir}/balancer.conf;\n}}\n"
        )
        command = ["nginx", "-p", str(self.dir), "-c", str(self.dir / "nginx.conf"), "-g", "daemon off;"]
        subprocess.run([*command[:-2], "-t"], check=True, capture_output=True)  # the config parses
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        for _ in range(100):
            try:
                httpx.get(f"{self.url}/healthz", timeout=1)
                return
            except httpx.TransportError:
                time.sleep(0.1)
        raise AssertionError("nginx did not start")

    def error_log(self) -> str:
        path = self.dir / "error.log"
        return path.read_text() if path.exists() else ""

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


@dataclass
class Answer:
    started: float
    seconds: float
    status: int
    ok: bool
    """200 with the expected text."""
    retry_after: str | None = None


@dataclass
class Load:
    """Answers of a closed loop; :meth:`stop` ends it."""

    answers: list[Answer] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def answered(self) -> int:
        return len(self.answers)

    def wait_for(self, count: int, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while self.answered() < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"only {self.answered()} of {count} answers after {timeout_s}s")
            time.sleep(0.05)

    def stop(self) -> list[Answer]:
        self._stop.set()
        for thread in self._threads:
            thread.join(120)
        return list(self.answers)


def closed_loop(url: str, png: bytes, objects: str, expected_text: str, concurrency: int) -> Load:
    """``concurrency`` clients, each sending ``/detect`` again as soon as it has its answer."""
    load = Load()

    def client() -> None:
        with httpx.Client(timeout=120) as http:
            while not load._stop.is_set():
                start = time.monotonic()
                try:
                    response = http.post(
                        f"{url}/detect", files={"image": ("x.png", png, "image/png")}, data={"objects": objects}
                    )
                    ok = response.status_code == 200 and response.json()["text"] == expected_text
                    answer = Answer(start, time.monotonic() - start, response.status_code, ok)
                    answer.retry_after = response.headers.get("retry-after")
                except httpx.HTTPError:
                    answer = Answer(start, time.monotonic() - start, 0, False)
                load.answers.append(answer)

    load._threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for thread in load._threads:
        thread.start()
    return load


def p99(answers: Sequence[Answer], where: Callable[[Answer], bool] = lambda a: True) -> float:
    """99th percentile latency (seconds) of the answers that match ``where``."""
    times = sorted(a.seconds for a in answers if where(a))
    return times[min(len(times) - 1, int(0.99 * len(times)))] if times else float("nan")


class Cluster:
    """Three replicas of ``model`` (held-out image 6 and its expected answer ready) behind :class:`Nginx`."""

    def __init__(self, model: Path) -> None:
        self.model = model
        self.replicas = [ServiceProcess(model, **REPLICA) for _ in range(3)]
        for replica in self.replicas:
            replica.__enter__()
        self.nginx = Nginx([r.port for r in self.replicas])
        self.png, _ = heldout_image(6)
        self.expected = self.detect(self.replicas[0].url).json()["text"]

    def detect(self, url: str) -> httpx.Response:
        files = {"image": ("x.png", self.png, "image/png")}
        return httpx.post(f"{url}/detect", files=files, data={"objects": OBJECTS}, timeout=60)

    def restart(self, index: int) -> None:
        old = self.replicas[index]
        old.close()
        self.replicas[index] = ServiceProcess(self.model, port=old.port, **REPLICA).__enter__()

    def close(self) -> None:
        self.nginx.close()
        for replica in self.replicas:
            replica.close()
