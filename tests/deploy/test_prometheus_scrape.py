"""A real Prometheus (Debian's ``prometheus``) scrapes the real service, both on loopback.

The service runs as ``python -m service`` on the tiny checkpoint; Prometheus gets a temporary config whose
only target is that service, scraping every second. The tests assert that the app's ``paligemma_*`` series
(and, with the vLLM engine, vLLM's ``vllm:*`` series) arrive in Prometheus' TSDB, that every query of the
provisioned Grafana dashboard and of the alert rules is valid PromQL for this Prometheus, and that
``promtool check metrics`` accepts the ``/metrics`` text. Install the tools with ``tools/setup_ops.sh``.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "paligemma.json"
RULES = ROOT / "deploy" / "prometheus" / "rules" / "paligemma.rules.yml"
# Series the app exports from its first scrape, whatever traffic it has had.
APP_SERIES = {
    "paligemma_http_requests_total",
    "paligemma_http_request_duration_seconds_bucket",
    "paligemma_engine_queue_depth",
    "paligemma_engine_requests_in_flight",
    "paligemma_engine_batch_size_bucket",
    "paligemma_generated_tokens_total",
    "paligemma_prompt_tokens_total",
    "paligemma_model_info",
}
# vLLM's engine metrics the dashboard, the alerts and the autoscaler use.
VLLM_SERIES = {
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:generation_tokens_total",
}
# The vLLM test runs once service/engines/factory.py opens the vLLM engine (not just mentions it in a comment).
VLLM_WIRED = "from service.engines.vllm_engine import" in (ROOT / "service" / "engines" / "factory.py").read_text()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: run tools/setup_ops.sh (Debian package `prometheus`)")
    return path


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group we started (the vLLM engine core is a child), then SIGKILL."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def wait_for(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[:3]} exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} not ready after {timeout:.0f}s:\n{log.read_text()[-4000:]}")


def start_service(model: Path, engine: str, tmp: Path, timeout: float) -> Iterator[str]:
    port = free_port()
    log = tmp / f"service-{engine}.log"
    cmd = [
        sys.executable,
        "-m",
        "service",
        "--model",
        str(model),
        "--engine",
        engine,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(f"{base}/readyz", proc, log, timeout)
        yield base
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def prometheus_bin() -> str:
    tool("promtool")
    return tool("prometheus")


def start_prometheus(prometheus: str, target: str, tmp: Path) -> Iterator[str]:
    port = free_port()
    config = tmp / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [{"job_name": "paligemma", "static_configs": [{"targets": [target]}]}],
            }
        )
    )
    log = tmp / "prometheus.log"
    cmd = [
        prometheus,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--storage.tsdb.retention.time=1h",
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=tmp, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(f"{base}/-/ready", proc, log, 30)
        yield base
    finally:
        stop(proc)


def query(prom: str, expr: str) -> list[dict[str, object]]:
    body = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=5).json()
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]  # type: ignore[no-any-return]


def wait_for_series(prom: str, names: set[str], timeout: float = 30) -> set[str]:
    """Metric names Prometheus has stored for job="paligemma", once ``names`` are all there (or timeout)."""
    deadline = time.monotonic() + timeout
    seen: set[str] = set()
    while time.monotonic() < deadline:
        resp = httpx.get(f"{prom}/api/v1/label/__name__/values", params={"match[]": '{job="paligemma"}'}, timeout=5)
        seen = set(resp.json()["data"])
        if names <= seen:
            return seen
        time.sleep(1)
    return seen


def detect_once(base: str) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, format="PNG")
    resp = httpx.post(
        f"{base}/detect",
        files={"image": ("x.png", buf.getvalue(), "image/png")},
        data={"objects": "cat", "max_new_tokens": "4"},
        timeout=120,
    )
    assert resp.status_code == 200, resp.text


def dashboard_and_rule_queries() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    exprs = [e.replace("$__rate_interval", "1m").replace("$instance", ".*") for e in exprs]
    rules = yaml.safe_load(RULES.read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    return exprs


def check_scrape(prom: str, base: str, expected: set[str]) -> None:
    detect_once(base)
    seen = wait_for_series(prom, expected | {"up"})
    assert expected <= seen, f"missing in Prometheus: {sorted(expected - seen)}"
    assert query(prom, 'up{job="paligemma"}')[0]["value"][1] == "1"  # type: ignore[index]
    # The request made above is counted and stored.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        hits = query(prom, 'paligemma_http_requests_total{endpoint="/detect", status="200"} > 0')
        if hits:
            break
        time.sleep(1)
    assert hits, "the /detect request never showed up in Prometheus"
    for expr in dashboard_and_rule_queries():  # every dashboard panel and rule parses and evaluates here
        query(prom, expr)


def promtool_check_metrics(base: str, allowed: str | None = None) -> None:
    """``promtool check metrics`` on /metrics: exit 0, or exit 3 (lint only) with every problem ``allowed``.

    Exit 1 (the text does not parse) always fails. vLLM's own names (``vllm:*``) break naming rules
    (colons; ``_total`` on a histogram), which are theirs; our metrics must pass with no problem at all.
    """
    text = httpx.get(f"{base}/metrics", timeout=10).content
    proc = subprocess.run([tool("promtool"), "check", "metrics"], input=text, capture_output=True, timeout=30)
    problems = [line for line in (proc.stdout + proc.stderr).decode().splitlines() if line.strip()]
    if proc.returncode == 0:
        return
    unexpected = [p for p in problems if allowed is None or not re.fullmatch(allowed, p)]
    assert proc.returncode == 3 and not unexpected, f"promtool check metrics exit {proc.returncode}:\n" + "\n".join(
        unexpected or problems
    )


def test_prometheus_scrapes_transformers_service(tiny_checkpoint: Path, prometheus_bin: str, tmp_path: Path) -> None:
    for base in start_service(tiny_checkpoint, "transformers", tmp_path, timeout=180):
        for prom in start_prometheus(prometheus_bin, base.removeprefix("http://"), tmp_path):
            check_scrape(prom, base, APP_SERIES)
        promtool_check_metrics(base)


@pytest.mark.vllm
@pytest.mark.skipif(not VLLM_WIRED, reason="service/engines/factory.py does not open service.engines.vllm_engine yet")
def test_prometheus_scrapes_vllm_service(tiny_checkpoint: Path, prometheus_bin: str, tmp_path: Path) -> None:
    for base in start_service(tiny_checkpoint, "vllm", tmp_path, timeout=600):
        for prom in start_prometheus(prometheus_bin, base.removeprefix("http://"), tmp_path):
            check_scrape(prom, base, APP_SERIES | VLLM_SERIES)
        # vLLM's own names are theirs: colons, and a histogram named vllm:iteration_tokens_total
        promtool_check_metrics(base, allowed=r"vllm:\S+ (metric names should not contain ':'|non-counter .*_total.*)")
