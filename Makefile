# vae-pipeline: `make run` and `make test` each bootstrap .venv on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

# Offline and quiet: no telemetry, no update checks, Prefect state inside the project.
export PREFECT_HOME := $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_UI_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 90
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export DVC_NO_ANALYTICS := 1
export AWS_EC2_METADATA_DISABLED := true
export PYTHONUNBUFFERED := 1

.PHONY: run test test-fast test-containers install data cxx podman images stack-containers-up stack-containers-down lint format bench clean help stack-up stack-down stack-status

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11) on PATH"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the project with its pins

data: $(FASHION_MNIST)  ## the default dataset (Debian's dataset-fashion-mnist)

$(FASHION_MNIST):
	@if [ "$$(id -u)" = 0 ]; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist; \
	else \
	  echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist'" \
	       "(or set data.fashion_mnist_dir: null in params.yaml to download it)"; exit 1; \
	fi

run: install data  ## the retrain flow on params.yaml (against the local stack when it is up)
	@if [ -f .stack/env ]; then echo "using the local stack (.stack/env)"; fi
	set -a; [ ! -f .stack/env ] || . .stack/env; set +a; \
	$(BIN)/vae-pipeline retrain $$VAE_PIPELINE_STACK_ARGS

stack-up: install  ## start mlflow server, prefect server and an S3 server (moto) on 127.0.0.1; writes .stack/env
	$(BIN)/python infra/local_stack.py up

stack-down:  ## stop the local stack (its data stays in .stack/)
	$(BIN)/python infra/local_stack.py down

stack-status:
	$(BIN)/python infra/local_stack.py status

cxx:  ## a C++ compiler, for torch.compile on CPU (train.compile; one test uses it)
	@command -v g++ >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q g++; \
	  else echo "torch.compile on CPU needs g++: run 'sudo apt-get install g++'"; exit 1; fi; }

podman:  ## podman, runc and mmdebstrap (Debian's packages), for the stack's images
	@command -v podman >/dev/null && command -v runc >/dev/null && command -v mmdebstrap >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman runc mmdebstrap; \
	  else echo "containers need podman, runc and mmdebstrap: run 'sudo apt-get install podman runc mmdebstrap'"; exit 1; fi; }

images: podman  ## build the stack's images with podman on a local Debian base (infra/podman/)
	CONTAINERS_CONF=$(CURDIR)/infra/podman/containers.conf infra/podman/images.sh

COMPOSE_LOCAL := CONTAINERS_CONF=$(CURDIR)/infra/podman/containers.conf $(BIN)/podman-compose \
  -f infra/compose.yaml -f infra/podman/compose.local.yaml

stack-containers-up: install images  ## the compose stack in containers with podman (infra/.env; docs/deployment.md)
	@test -f infra/.env || { echo "infra/.env is missing: cp infra/.env.example infra/.env, then set every change-me"; exit 1; }
	$(COMPOSE_LOCAL) up -d --no-deps

stack-containers-down:  ## stop the compose stack's containers (its volumes stay)
	$(COMPOSE_LOCAL) down

test-containers: install data podman  ## the container tests (tests/test_containers.py, tests/test_compose_stack.py; they build the images first)
	CONTAINERS_CONF=$(CURDIR)/infra/podman/containers.conf $(BIN)/python -m pytest -q -m containers --durations=5 tests/test_containers.py tests/test_compose_stack.py

test: install data cxx  ## the linter, then the test suite
	$(BIN)/ruff check vae_pipeline flows tests bench infra
	$(BIN)/python -m pytest -q

test-fast: install data cxx  ## the inner loop: ruff, then the suite without its slow (end-to-end) tests
	$(BIN)/ruff check vae_pipeline flows tests bench infra
	$(BIN)/python -m pytest -q -m "not slow"

bench: install  ## benchmarks (see docs/benchmarks.md); not part of the tests
	$(BIN)/python bench/eval_throughput.py
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/data_throughput.py

lint: install  ## ruff check + format check
	$(BIN)/ruff check vae_pipeline flows tests bench infra
	$(BIN)/ruff format --check vae_pipeline flows tests bench infra

format: install
	$(BIN)/ruff format vae_pipeline flows tests bench infra
	$(BIN)/ruff check --fix vae_pipeline flows tests

clean:  ## remove run outputs (keeps .venv, the DVC cache and the MLflow store)
	rm -rf runs reports models data/prepared
