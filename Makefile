# The two commands: `make pipeline` (set up + run everything on the embedded default)
# and `make test` (set up + run the test suite). Both work on a fresh machine.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export RAY_DEDUP_LOGS := 1
export RAY_USAGE_STATS_ENABLED := 0

# The embedded default: an S3 endpoint on loopback with throwaway credentials. Its port and credentials
# live in pipelines/stack.py; `gan stack env` prints them (another port: make pipeline GAN_S3_PORT=9600).
# For real S3/MinIO, set data.source in params.yaml and the AWS_* variables, and run `dvc repro` instead.
EMBEDDED_ENV = eval "$$(gan stack env)" &&

# make pipeline PRESET=photos-64: the same pipeline with the params of presets/photos-64 set through
# `dvc exp run -S` (params.yaml is changed in place, as dvc exp run does; git diff shows it).
PRESET ?=
PRESET_FILE = presets/$(PRESET)
REPRO = $(if $(PRESET),dvc exp run $(addprefix -S ,$(shell grep -v '^\#' $(PRESET_FILE) 2>/dev/null)),dvc repro)

LOCK := requirements.lock

.PHONY: setup pipeline test test-fast lock stack-up stack-down clean

setup: $(STAMP)

# torch is installed first and pinned: a looser requirement would pull CUDA wheels. Everything else comes at the
# exact versions of requirements.lock (the same environment tomorrow); its hash is in every registered version.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c $(LOCK) -e '.[test]'
	touch $(STAMP)

# Re-resolve pyproject.toml's ranges in a throwaway venv and rewrite requirements.lock (then commit it).
lock:
	rm -rf .venv-lock && python3 -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip
	.venv-lock/bin/python -m pip install -q torch==2.13.0
	.venv-lock/bin/python -m pip install -q -e '.[test]'
	{ sed -n '1,2p' $(LOCK); .venv-lock/bin/python -m pip freeze --exclude-editable | grep -v '^#' \
	  | sed -E 's/^(torch==[0-9.]+)\+[a-z0-9]+$$/\1/'; } > $(LOCK).new && mv $(LOCK).new $(LOCK)
	rm -rf .venv-lock

stack-up: setup
	gan stack up

stack-down: setup
	gan stack down

pipeline: stack-up
	@test -z "$(PRESET)" -o -f "$(PRESET_FILE)" || { echo "make: error: no preset $(PRESET_FILE); choose one of: $$(ls presets | tr "\n" " ")" >&2; exit 2; }
	$(EMBEDDED_ENV) time $(REPRO)
	$(EMBEDDED_ENV) dvc push
	$(PY) -m benchmarks.results --pipeline

test: setup
	$(PY) -m pytest

# The inner loop: everything but the whole-pipeline e2e tests.
test-fast: setup
	$(PY) -m pytest -m "not e2e" --ignore=tests/e2e

clean:
	rm -rf .ray_storage mlflow.db mlartifacts results models/gan models/featurenet.pt data/prepared reports
