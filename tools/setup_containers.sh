#!/usr/bin/env bash
# A container engine for tests/deploy/test_compose.py on a machine without Docker (idempotent; seconds when
# everything is there, about a minute the first time):
#   - Debian's podman with runc (crun fails on these hosts' hybrid cgroups), iptables for its bridge network,
#     catatonit for `init: true`, debootstrap; settings in tools/containers/containers.conf (CONTAINERS_CONF),
#     the machine's own container config is not touched;
#   - stand-ins, under the exact names the Dockerfile and compose file use, for the base images that cannot be
#     pulled here: a Debian bookworm root (debootstrap from the mirror apt uses) imported as an image, then
#     python (the Dockerfile's `cpu` stage) and prometheus (docker-compose.yml) built on it. Each carries a
#     label with the hash of what built it and is rebuilt when that changes.
# The test starts podman's Docker-API socket itself (`podman system service`) and drives it with the compose CLI.
# Grafana and the `gpu` target (vllm/vllm-openai, CUDA) have no stand-in: their checks stay static.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
[ -x "$PY" ] || { echo "no $PY: run tools/setup_cpu.sh (make setup) first" >&2; exit 1; }
export CONTAINERS_CONF="$PWD/tools/containers/containers.conf"
sudo_=""
[ "$(id -u)" = 0 ] || sudo_="sudo"

need=()
for tool in podman:podman runc:runc iptables:iptables debootstrap:debootstrap catatonit:catatonit; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || [ -x "/usr/libexec/podman/${tool%%:*}" ] || need+=("${tool##*:}")
done
# Compose's service names and aliases (Prometheus finds the replicas as paligemma-replicas) resolve only with
# a DNS plugin: podman 4.3's CNI backend without it gives containers no names at all.
[ -x /usr/lib/cni/dnsname ] || need+=(golang-github-containernetworking-plugin-dnsname)
if [ ${#need[@]} -gt 0 ]; then
    echo "Installing ${need[*]} (Debian packages)..."
    $sudo_ apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

label() { podman image inspect --format '{{index .Labels "paligemma.standin"}}' "$1" 2>/dev/null || true; }

# The Debian mirror apt already uses here (deb822 or one-line sources).
mirror=$(grep -hoE '^URIs: *\S+/debian/?$|^deb +\S+/debian/? ' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
    | head -n1 | sed -E 's/^URIs: *//; s/^deb +//; s/ $//') || true
mirror=${mirror:-http://deb.debian.org/debian}
base=localhost/paligemma-standin/debian:bookworm
key=$(printf 'minbase bookworm %s' "$mirror" | sha256sum | cut -c1-16)
if [ "$(label "$base")" != "$key" ]; then
    echo "Building $base (debootstrap --variant=minbase bookworm from $mirror, ~40 s)..."
    root=$(mktemp -d)
    trap '$sudo_ rm -rf "$root"' EXIT
    $sudo_ debootstrap --variant=minbase bookworm "$root" "$mirror" >/dev/null
    $sudo_ tar -C "$root" -c . | podman import --change "LABEL paligemma.standin=$key" --change 'CMD ["bash"]' - "$base" >/dev/null
fi

# Build one stand-in from tools/containers/NAME.Containerfile with CONTEXT; rebuilt when either changes.
standin() {
    local image=$1 file=$2 context=$3 key
    key=$( (cat "$file"; find "$context" -type f -printf '%P %s\n' | sort; label "$base") | sha256sum | cut -c1-16)
    if [ "$(label "$image")" != "$key" ]; then
        echo "Building stand-in $image from $file..."
        podman build -q --label "paligemma.standin=$key" -f "$file" -t "$image" "$context" >/dev/null
    fi
}

# python: the Dockerfile's cpu stage base, with the CPU torch this stack pins as a one-package index.
python_image=$(sed -nE 's/^FROM (\S+) AS cpu$/\1/p' Dockerfile)
case "$python_image" in */*) ;; *) python_image="docker.io/library/$python_image" ;; esac
torch_version=$("$PY" -c "import torch; print(torch.__version__)")
ctx=$(mktemp -d)
mkdir -p "$ctx/ca-certificates" "$ctx/torch-cpu/simple/torch"
cp /usr/local/share/ca-certificates/*.crt "$ctx/ca-certificates/" 2>/dev/null || true
# The wheel comes from wherever this machine's pip finds it (a local wheel folder here, PyTorch's index elsewhere).
"$PY" -m pip download --quiet --no-deps --only-binary=:all: "torch==$torch_version" -d "$ctx/torch-cpu/simple/torch"
wheel=$(basename "$(ls "$ctx"/torch-cpu/simple/torch/torch-*.whl)")
printf '<html><body><a href="%s">%s</a></body></html>\n' "${wheel//+/%2B}" "$wheel" > "$ctx/torch-cpu/simple/torch/index.html"
standin "$python_image" tools/containers/python.Containerfile "$ctx"
rm -rf "$ctx"

prometheus_image=$(sed -nE 's/^ +image: (\S*prometheus\S*)$/\1/p' docker-compose.yml | head -n1)
case "$prometheus_image" in */*/*) ;; *) prometheus_image="docker.io/$prometheus_image" ;; esac
ctx=$(mktemp -d)
standin "$prometheus_image" tools/containers/prometheus.Containerfile "$ctx"
rm -rf "$ctx"

echo "containers: $(podman --version), runtime $(podman info --format '{{.Host.OCIRuntime.Name}}');" \
    "stand-ins $python_image, $prometheus_image"
