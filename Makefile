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

CLUSTER_STAMP := $(VENV)/.dsf-cluster-installed
# apt needs root; a developer who is not root gets sudo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo test test-cluster slurm-packages lint clean-results

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q $(TORCH_PINS)
	$(VENV)/bin/python -m pip install -q -e '.[dev]' $(TORCH_PINS)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) --rerun-incomplete --printshellcmds --show-failed-logs \
		--max-checksum-file-size 67108864
	$(BIN)/snakemake --report results/report.html

# The cluster tests start a real SLURM: `make test-cluster`. The test files are spread over
# the cores (pytest-xdist), each file's tests in one process, which builds its fixtures once.
test: $(STAMP)
	$(BIN)/python -m pytest -m "not cluster" -n auto --dist loadfile

# Debian's single-node SLURM and munge (skipped once installed) and the `cluster` extra, then
# tests/cluster: the workflow through profiles/slurm on a SLURM it starts and stops (root).
test-cluster: $(CLUSTER_STAMP) slurm-packages
	$(BIN)/python -m pytest tests/cluster -m cluster

$(CLUSTER_STAMP): $(STAMP)
	$(VENV)/bin/python -m pip install -q -e '.[dev,cluster]' $(TORCH_PINS)
	touch $(CLUSTER_STAMP)

slurm-packages:
	@if [ "$$(dpkg-query -W -f='$${Status}\n' slurm-wlm munge 2>/dev/null | grep -c ' installed$$')" = 2 ]; then \
		echo "slurm-wlm and munge are installed"; \
	else \
		$(SUDO) apt-get update -q && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/snakemake --lint

clean-results:
	rm -rf results .snakemake
