"""The shipped nginx balancer in front of three real replicas on the demo model, under a steady load.

A replica killed with SIGKILL mid-load, a rolling restart (each replica drained with SIGTERM and started
again), and every replica overloaded at once: clients see correct 200s (0 lost, 0 errors) in the first two
cases and a 503 with ``Retry-After`` (never a 502, never a hang) in the third. The replicas have 2 slots
and 2 queue places each, so the overload is reachable.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.deploy.nginx_balancer import OBJECTS, Cluster, closed_loop

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("nginx") is None, reason="tools/setup_ops.sh installs nginx"),
]


@pytest.fixture(scope="module")
def cluster(demo_checkpoint: Path) -> Iterator[Cluster]:
    if shutil.which("nginx") is None:
        pytest.fail("nginx is not installed: tools/setup_ops.sh (run by make test) installs it")
    running = Cluster(demo_checkpoint)
    yield running
    running.close()


def test_a_killed_replica_loses_no_request(cluster: Cluster) -> None:
    load = closed_loop(cluster.nginx.url, cluster.png, OBJECTS, cluster.expected, concurrency=4)
    load.wait_for(60)
    killed_at = time.monotonic()
    cluster.replicas[0].process.kill()  # SIGKILL: no drain, connections reset
    load.wait_for(load.answered() + 120)
    answers = load.stop()
    assert [a for a in answers if not a.ok] == []
    assert sum(a.started >= killed_at for a in answers) >= 100
    cluster.restart(0)


def test_a_rolling_restart_loses_no_request(cluster: Cluster) -> None:
    load = closed_loop(cluster.nginx.url, cluster.png, OBJECTS, cluster.expected, concurrency=4)
    load.wait_for(20)
    for index in range(len(cluster.replicas)):
        cluster.replicas[index].sigterm()  # drains: /readyz and new requests 503, in-flight ones finish
        cluster.replicas[index].process.wait(timeout=60)
        cluster.restart(index)
        load.wait_for(load.answered() + 20)
    answers = load.stop()
    assert [a for a in answers if not a.ok] == []


def test_every_replica_overloaded_gives_503_with_retry_after(cluster: Cluster) -> None:
    with ThreadPoolExecutor(48) as pool:
        responses = list(pool.map(lambda _: cluster.detect(cluster.nginx.url), range(96)))
    statuses = {r.status_code for r in responses}
    assert statuses <= {200, 503}, statuses
    assert 503 in statuses  # 3 replicas x 4 places < 48 at once
    assert all(r.headers.get("retry-after") for r in responses if r.status_code == 503)
    assert all(r.json()["text"] == cluster.expected for r in responses if r.status_code == 200)


def test_no_replica_left_gives_503_not_502(cluster: Cluster) -> None:
    """Last, since it stops them: with every replica gone nginx answers the service's 503 shape itself."""
    for replica in cluster.replicas:
        replica.process.kill()
        replica.process.wait(timeout=30)
    response = cluster.detect(cluster.nginx.url)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "no_replica"
