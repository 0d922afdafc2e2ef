"""The compose stack on podman: its Docker-API socket, the compose CLI, and cleanup that leaves nothing behind.

``tools/setup_containers.sh`` installs podman (runc) and builds the stand-in base images; this module starts
``podman system service`` on a socket of its own and runs the project's compose files through the compose CLI
against it, under a project name and published ports of its own. Podman without systemd has no timer for
health checks, so :meth:`ComposeStack.wait_healthy` runs the container's own check on the schedule the compose
file gives (``podman healthcheck run``, what the timer would do) and the status the Docker API reports is read.
Used by ``tests/deploy/test_compose.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from tests.reliability.server import free_port

ROOT = Path(__file__).resolve().parents[2]
CONTAINERS_CONF = ROOT / "tools" / "containers" / "containers.conf"
COMPOSE_FILES = ("docker-compose.yml", "docker-compose.cpu.yml")
SERVICES = ("paligemma", "prometheus")
"""Grafana has no image here (no registry, no Debian package): only its static checks run."""
PYTHON_STANDIN = "docker.io/library/python:3.11-slim-bookworm"
TORCH_CPU_INDEX = "file:///opt/torch-cpu/simple"
"""The stand-in's mirror of PyTorch's CPU index (tools/containers/python.Containerfile)."""


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}
    return subprocess.run(["podman", *args], env=env, capture_output=True, text=True, timeout=timeout, check=check)


def engine_problem() -> str | None:
    """Why the stack cannot run here, or None."""
    if shutil.which("podman") is None:
        return "podman is not installed"
    if podman("image", "exists", PYTHON_STANDIN, check=False).returncode != 0:
        return f"no {PYTHON_STANDIN} image (the stand-in tools/setup_containers.sh builds)"
    return None


class ComposeStack:
    """``docker compose -f docker-compose.yml -f docker-compose.cpu.yml up -d --build paligemma prometheus``."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="compose-test-"))
        self.socket = self.dir / "podman.sock"
        self.project = f"paligemma-test-{os.getpid()}"
        self.port, self.prometheus_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.health = ""
        self.figures: dict[str, float] = {}
        """Seconds: ``up`` (build + start), ``healthy`` (after up); bytes: ``image``."""
        self.prometheus_url = f"http://127.0.0.1:{self.prometheus_port}"
        self.env = {
            **os.environ,
            "DOCKER_HOST": f"unix://{self.socket}",
            "DOCKER_CONFIG": str(ROOT / ".venv" / "docker"),  # the compose plugin tools/setup_ops.sh links
            "DOCKER_BUILDKIT": "0",  # the engine's own builder (buildah); BuildKit would need a registry image
            "COMPOSE_PROJECT_NAME": self.project,
            "PALIGEMMA_PUBLISH_PORT": str(self.port),
            "PROMETHEUS_PUBLISH_PORT": str(self.prometheus_port),
            "TORCH_CPU_INDEX": TORCH_CPU_INDEX,
        }
        self._api_log = (self.dir / "podman-api.log").open("w")
        self.api = subprocess.Popen(
            ["podman", "system", "service", "--time=0", f"unix://{self.socket}"],
            env={**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)},
            stdout=self._api_log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while not self._ping():
            if time.monotonic() > deadline or self.api.poll() is not None:
                raise AssertionError(f"podman API did not start: {(self.dir / 'podman-api.log').read_text()}")
            time.sleep(0.2)

    def _ping(self) -> bool:
        try:
            with httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket))) as client:
                return client.get("http://d/_ping", timeout=2).text == "OK"
        except httpx.TransportError:
            return False

    def compose(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        files = [arg for name in COMPOSE_FILES for arg in ("-f", name)]
        command = ["docker", "compose", *files, *args]
        result = subprocess.run(command, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            output = f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
            raise AssertionError(f"{' '.join(command)} exited {result.returncode}:\n{output}")
        return result

    def up(self) -> None:
        """Build the image and start the service and Prometheus, then wait until the service is healthy."""
        start = time.monotonic()
        self.compose("up", "-d", "--build", *SERVICES, timeout=1800)
        self.figures["up"] = time.monotonic() - start
        start = time.monotonic()
        self.health = self.wait_healthy("paligemma", timeout_s=600)
        self.figures["healthy"] = time.monotonic() - start
        image = str(self.inspect("paligemma")["Image"])
        self.figures["image"] = float(podman("image", "inspect", "--format", "{{.Size}}", image).stdout)

    def container(self, service: str) -> str:
        return self.compose("ps", "-a", "-q", service).stdout.strip()

    def inspect(self, service: str) -> dict[str, object]:
        result = subprocess.run(
            ["docker", "inspect", self.container(service)], env=self.env, capture_output=True, text=True, check=True
        )
        return dict(json.loads(result.stdout)[0])

    def wait_healthy(self, service: str, timeout_s: float) -> str:
        """Run the service's health check every ``interval`` until it passes; the status Docker's API reports."""
        check = self.compose("config", "--format", "json").stdout
        interval = _seconds(json.loads(check)["services"][service]["healthcheck"]["interval"])
        container, deadline = self.container(service), time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = self.inspect(service)["State"]
            assert isinstance(state, dict)
            if not state.get("Running"):
                raise AssertionError(f"{service} stopped ({state}):\n{self.logs(service)}")
            if podman("healthcheck", "run", container, check=False).returncode == 0:
                return state_health(self.inspect(service))
            time.sleep(min(interval, 5.0))
        raise AssertionError(f"{service} not healthy after {timeout_s:g}s:\n{self.logs(service)}")

    def logs(self, service: str) -> str:
        return self.compose("logs", "--no-color", service, check=False).stdout[-6000:]

    def exit_codes(self, container: str) -> list[int]:
        """Exit codes podman recorded for ``container`` ("died" events), oldest first (0 is left out of the event)."""
        events = podman(
            "events",
            "--stream=false",
            "--since",
            "2h",
            "--filter",
            f"container={container}",
            "--filter",
            "event=died",
            "--format",
            "json",
        ).stdout
        return [int(json.loads(line).get("ContainerExitCode", 0)) for line in events.splitlines() if line.strip()]

    @property
    def _label(self) -> str:
        return f"label=com.docker.compose.project={self.project}"

    def leftovers(self) -> list[str]:
        """Containers, volumes and networks of this project that still exist."""
        label = self._label
        found = podman("ps", "-a", "--filter", label, "--format", "{{.Names}}", check=False).stdout.split()
        found += podman("volume", "ls", "--filter", label, "--format", "{{.Name}}", check=False).stdout.split()
        found += podman("network", "ls", "--filter", label, "--format", "{{.Name}}", check=False).stdout.split()
        return found

    def close(self) -> list[str]:
        """Remove everything of the project (also after a failure) and stop the API; returns what is left."""
        try:
            self.compose("down", "--volumes", "--remove-orphans", "--timeout", "0", timeout=180, check=False)
        finally:
            self.api.terminate()
            try:
                self.api.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.api.kill()
            self._api_log.close()
        for name in podman("ps", "-a", "--filter", self._label, "--format", "{{.ID}}", check=False).stdout.split():
            podman("rm", "-f", "-t", "0", name, check=False)
        left = self.leftovers()
        shutil.rmtree(self.dir, ignore_errors=True)
        return left


def state_health(inspected: dict[str, object]) -> str:
    state = inspected["State"]
    assert isinstance(state, dict)
    return str((state.get("Health") or {}).get("Status"))


def _seconds(text: str) -> float:
    """A compose duration ("15s", "1m30s") in seconds."""
    import re

    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(ms|h|m|s)", text))
