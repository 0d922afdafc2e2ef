#!/usr/bin/env bash
# Static checks of the deployment files; no Docker engine, cluster or network needed. Run
# tools/setup_ops.sh first (make check-deploy does). Exits non-zero on the first failing check.
#   1. docker compose config: docker-compose.yml alone, + docker-compose.cpu.yml, + docker-compose.multi-gpu.yml
#      (compose v2 parses, interpolates and validates against the compose spec), and stop_grace_period is
#      at least the drain timeout + 5 s in each.
#   2. hadolint on the Dockerfile.
#   3. The Dockerfile: vLLM base image tag == the vLLM version pyproject pins (gpu and cpu extras); the cpu
#      target installs with tools/setup_cpu.sh, the script `make setup` (and so CI) runs.
#   4. kubernetes-validate --strict on deploy/k8s/*.yaml (bundled schemas, offline).
#   5. promtool check config / check rules / test rules on deploy/prometheus/.
#   6. The Grafana dashboard is valid JSON that uses the provisioned datasource uid.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
export DOCKER_CONFIG="$PWD/$VENV/docker"
ok() { printf 'ok   %s\n' "$*"; }

if command -v docker >/dev/null 2>&1; then compose=(docker compose); else compose=("$DOCKER_CONFIG/cli-plugins/docker-compose"); fi
for files in "docker-compose.yml" "docker-compose.yml docker-compose.cpu.yml" "docker-compose.yml docker-compose.multi-gpu.yml"; do
    args=()
    for f in $files; do args+=(-f "$f"); done
    "${compose[@]}" "${args[@]}" config --quiet
    "${compose[@]}" "${args[@]}" config --format json | "$PY" -c '
import json, re, sys
services = json.load(sys.stdin)["services"]
def seconds(text):
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(ms|h|m|s)", text))
for name, svc in services.items():
    env = svc.get("environment") or {}
    if "PALIGEMMA_DRAIN_TIMEOUT_S" not in env:
        continue
    grace, drain = seconds(svc.get("stop_grace_period", "10s")), float(env["PALIGEMMA_DRAIN_TIMEOUT_S"])
    if grace < drain + 5:
        sys.exit(f"{name}: stop_grace_period {grace:g}s < drain timeout {drain:g}s + 5s")
'
    ok "docker compose config: $files"
done

"$VENV/bin/hadolint" Dockerfile
ok "hadolint Dockerfile"

"$PY" - <<'PYEOF'
import re
import sys
import tomllib

dockerfile = open("Dockerfile").read()
extras = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]
pins = {re.sub(r"\s", "", d) for d in extras["gpu"] + extras["cpu"] if d.startswith("vllm")}
versions = {p.split("==")[1] for p in pins}
arg = re.search(r"^ARG VLLM_VERSION=(\S+)$", dockerfile, re.M)
errors = []
if not arg or versions != {arg.group(1)}:
    errors.append(f"Dockerfile ARG VLLM_VERSION={arg and arg.group(1)} but pyproject pins {sorted(pins)}")
if not re.search(r"^FROM vllm/vllm-openai:v\$\{VLLM_VERSION\} AS gpu$", dockerfile, re.M):
    errors.append("the gpu target must be FROM vllm/vllm-openai:v${VLLM_VERSION}")
# The cpu stage must run the very script CI's `make setup` runs.
cpu_stage = re.search(r"^FROM \S+ AS cpu$(.*?)(?=^FROM )", dockerfile, re.M | re.S)
makefile = open("Makefile").read()
ci_script = re.search(r"^\t.*\b(tools/setup_cpu\.sh)\b", makefile, re.M)
if not ci_script:
    errors.append("Makefile's setup no longer runs tools/setup_cpu.sh: update this check")
elif not cpu_stage or not re.search(r"^RUN\b[^\n]*(\\\n[^\n]*)*\btools/setup_cpu\.sh\b", cpu_stage.group(1), re.M):
    errors.append("the cpu target must RUN tools/setup_cpu.sh (the script make setup / CI use)")
if errors:
    sys.exit("\n".join(errors))
PYEOF
ok "Dockerfile: vllm-openai:v$(sed -n 's/^ARG VLLM_VERSION=//p' Dockerfile) matches pyproject; cpu target runs tools/setup_cpu.sh"

"$VENV/bin/kubernetes-validate" --strict --quiet deploy/k8s/*.yaml
ok "kubernetes-validate --strict deploy/k8s/*.yaml"

promtool check config deploy/prometheus/prometheus.yml >/dev/null
promtool check rules deploy/prometheus/rules/*.rules.yml >/dev/null
promtool test rules deploy/prometheus/rules/*.test.yml >/dev/null
ok "promtool check config / check rules / test rules deploy/prometheus"

"$PY" - <<'PYEOF'
import json
import pathlib

import yaml

ds = yaml.safe_load(open("deploy/grafana/provisioning/datasources/prometheus.yml"))["datasources"]
uids = {d["uid"] for d in ds}
for path in pathlib.Path("deploy/grafana/dashboards").glob("*.json"):
    board = json.loads(path.read_text())
    for panel in board["panels"]:
        uid = panel.get("datasource", {}).get("uid")
        assert uid in uids, f"{path}: panel {panel['title']!r} uses datasource {uid!r}, provisioned: {uids}"
        assert panel.get("targets") or panel["type"] == "row", f"{path}: panel {panel['title']!r} has no query"
PYEOF
ok "grafana dashboards use the provisioned datasource"
