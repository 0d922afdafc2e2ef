# The two commands: `make serve` and `make test`. Everything else is a step they run.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1

.PHONY: setup serve test lint tiny clean

$(STAMP): pyproject.toml tools/setup_cpu.sh tools/torchvision_cpu_fix.py
	PYTHON=$(PYTHON) VENV=$(VENV) tools/setup_cpu.sh
	touch $(STAMP)

setup: $(STAMP)

tiny: setup  ## a tiny random PaliGemma in artifacts/tiny
	$(PY) -m finetune tiny --out artifacts/tiny

.PHONY: demo-model
demo-model: setup  ## retrain the demo model into artifacts/demo-model (step-bounded, ~45 min on 2 cores; models/demo ships)
	$(PY) -m finetune demo

.PHONY: demo-lora
demo-lora: setup  ## teach models/demo a fourth shape with LoRA (6,000 steps: 24 min on 2 busy cores), merge, score it served 5 ways
	$(PY) -m finetune lora-demo

.PHONY: demo-segment
demo-segment: setup  ## finetune models/demo to segment (4,000 steps, one thread), score /segment on both engines
	$(PY) -m finetune segment-demo

serve: setup  ## the HTTP service on :8000; without PALIGEMMA_MODEL, the committed demo model (models/demo)
	@if [ -z "$$PALIGEMMA_MODEL" ]; then \
		exec $(PY) -m service --model models/demo --engine transformers --port 8000; \
	else \
		exec $(PY) -m service --port 8000; \
	fi

test: setup  ## the whole suite: unit, service, vLLM CPU, browser, deploy checks, the compose stack on podman
	VENV=$(VENV) tools/setup_ops.sh
	tools/setup_browser.sh
	VENV=$(VENV) tools/setup_containers.sh
	VENV=$(VENV) tools/check_deploy.sh
	PALIGEMMA_REQUIRE_BROWSER=1 PALIGEMMA_REQUIRE_CONTAINERS=1 $(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check paligemma service finetune tests
	$(VENV)/bin/mypy

.PHONY: check-deploy
check-deploy: setup  ## compose config, hadolint, k8s schemas, promtool (tools needed: tools/setup_ops.sh)
	VENV=$(VENV) tools/setup_ops.sh
	VENV=$(VENV) tools/check_deploy.sh

clean:
	rm -rf $(VENV) artifacts .pytest_cache .hypothesis
