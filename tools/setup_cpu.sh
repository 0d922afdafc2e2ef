#!/usr/bin/env bash
# Creates .venv with the CPU stack (vLLM CPU build, torch 2.13.0+cpu, transformers, peft, test tools).
# Used by `make setup` (and so by `make serve`, `make test` and CI) and by the CPU Dockerfile target.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
VENV=${VENV:-.venv}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade "pip>=24"
echo "Installing the CPU stack into $VENV (first time: ~4 min, ~3.5 GB)..."
"$VENV/bin/python" -m pip install --quiet --progress-bar off -e ".[serve,cpu,finetune,dev]"

# PyPI's CUDA-built torchaudio/torchcodec cannot load beside the CPU torch and nothing here needs them,
# but transformers imports torchaudio when it is installed.
if ! "$VENV/bin/python" -c "import torchaudio" >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip uninstall --quiet -y torchaudio torchcodec || true
fi

# PyPI's torchvision is a CUDA build: beside the CPU torch it fails with
# "operator torchvision::nms does not exist". Apply the fix only when that is what happens.
site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
rm -f "$site/torchvision_cpu_fix.pth" "$site/torchvision_cpu_fix.py"
if ! err=$("$VENV/bin/python" -c "import torchvision" 2>&1); then
    if grep -q "torchvision::nms does not exist" <<<"$err"; then
        echo "PyPI torchvision does not match the CPU torch: installing tools/torchvision_cpu_fix.py"
        cp tools/torchvision_cpu_fix.py "$site/"
        echo "import torchvision_cpu_fix" > "$site/torchvision_cpu_fix.pth"
        "$VENV/bin/python" -c "import torchvision"
    else
        echo "$err" >&2
        exit 1
    fi
fi
"$VENV/bin/python" -c "import torch, torchvision, transformers, vllm; print(f'torch {torch.__version__}, transformers {transformers.__version__}, vllm {vllm.__version__}')"
# vLLM finds the project's prefix-LM plugin through the package's entry point (service/vllm_plugin)
"$VENV/bin/python" -c "from service.engines.vllm_plugin import plugin_active; assert plugin_active(), 'vLLM does not see the paligemma_prefix_lm plugin'"
