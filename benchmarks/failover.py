"""Figures of the balancer failover checks: the shipped nginx config in front of three demo replicas.

    .venv/bin/python benchmarks/failover.py [--clients 4] [--before 100] [--after 200]

Steady closed-loop ``/detect`` load through nginx (tests/deploy/nginx_balancer.py): ``--before`` answers,
then one replica is SIGKILLed and ``--after`` more answers are collected; then a rolling restart (each
replica drained with SIGTERM and started again). Prints requests sent, answered correctly, failed, and p99
latency before and during the kill. The same checks run in ``make test`` (tests/deploy/test_nginx_failover.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the harness lives in the tests package
from tests.demo_model import DEMO_MODEL  # noqa: E402
from tests.deploy.nginx_balancer import OBJECTS, Cluster, closed_loop, p99  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--before", type=int, default=100)
    parser.add_argument("--after", type=int, default=200)
    args = parser.parse_args()
    cluster = Cluster(DEMO_MODEL)
    try:
        load = closed_loop(cluster.nginx.url, cluster.png, OBJECTS, cluster.expected, args.clients)
        load.wait_for(args.before)
        killed_at = time.monotonic()
        cluster.replicas[0].process.kill()
        load.wait_for(load.answered() + args.after)
        kill = load.stop()
        cluster.restart(0)
        load = closed_loop(cluster.nginx.url, cluster.png, OBJECTS, cluster.expected, args.clients)
        for index in range(len(cluster.replicas)):
            cluster.replicas[index].sigterm()
            cluster.replicas[index].process.wait(timeout=60)
            cluster.restart(index)
            load.wait_for(load.answered() + 20)
        rolling = load.stop()
    finally:
        cluster.close()
    during = [a for a in kill if a.started >= killed_at]
    lines = [
        f"{args.clients} clients, /detect on the demo model through nginx, 3 replicas",
        f"kill -9: {len(kill)} sent, {sum(a.ok for a in kill)} correct, {sum(not a.ok for a in kill)} failed; "
        f"{len(during)} sent after the kill",
        f"p99 latency: before {p99(kill, lambda a: a.started < killed_at) * 1000:.0f} ms, "
        f"after the kill {p99(during) * 1000:.0f} ms, slowest after {max(a.seconds for a in during) * 1000:.0f} ms",
        f"rolling restart: {len(rolling)} sent, {sum(a.ok for a in rolling)} correct, "
        f"{sum(not a.ok for a in rolling)} failed",
    ]
    print("\n".join(lines))  # noqa: T201 - a benchmark prints its figures


if __name__ == "__main__":
    main()
