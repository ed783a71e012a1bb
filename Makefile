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

# The embedded default: an S3 endpoint on loopback with throwaway credentials.
# Point these (and data.source in params.yaml) at real S3/MinIO and run `dvc repro` instead.
S3_PORT ?= 9555
EMBEDDED_ENV := AWS_ENDPOINT_URL=http://127.0.0.1:$(S3_PORT) AWS_ACCESS_KEY_ID=testing \
	AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1 GAN_S3_PORT=$(S3_PORT)

.PHONY: setup pipeline test stack-up stack-down clean

setup: $(STAMP)

# torch is installed first and pinned: a looser requirement would pull CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

stack-up: setup
	$(EMBEDDED_ENV) gan stack up

stack-down: setup
	gan stack down

pipeline: stack-up
	time $(EMBEDDED_ENV) dvc repro
	$(EMBEDDED_ENV) dvc push
	dvc metrics show

test: setup
	$(PY) -m pytest

clean:
	rm -rf .ray_storage mlflow.db mlartifacts results models/gan models/featurenet.pt data/prepared reports
