# dsf: the two commands a user needs are `make demo` and `make test`.
# The set-up step is shared and skipped when .venv is already up to date.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(abspath $(VENV)/bin)
STAMP := $(VENV)/.dsf-installed
CORES ?= 2
ARCH := $(shell uname -m)

# torch/torchvision come from this machine's local wheels; pinned here (the package itself keeps
# a range, since GPU machines bring their own torch). aarch64 has only the 2.9.1 CPU build.
ifeq ($(ARCH),aarch64)
TORCH_PINS := torch==2.9.1 torchvision==0.24.1
else
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
endif

export PATH := $(BIN):$(PATH)

.PHONY: setup demo test lint clean-results

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q $(TORCH_PINS)
	$(VENV)/bin/python -m pip install -q -e '.[dev]' $(TORCH_PINS)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) --rerun-incomplete --printshellcmds

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/snakemake --lint

clean-results:
	rm -rf results .snakemake
