# Two commands for a fresh machine: `make demo` and `make test`.
# Both create .venv when it is missing and install what they need into it.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

# Machines without an NVIDIA GPU get a pinned torch release (a CPU build where one lies on the
# local disk or package index); machines with a GPU take whatever torch>=2.1 pip resolves.
ifeq ($(shell command -v nvidia-smi 2>/dev/null),)
TORCH_SPEC ?= torch==2.13.0
else
TORCH_SPEC ?= torch>=2.1
endif

.PHONY: demo test lint install clean

$(VENV)/.stamp-base: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e .
	touch $@

$(VENV)/.stamp-test: $(VENV)/.stamp-base
	$(PIP) install -q -e ".[test]"
	touch $@

install: $(VENV)/.stamp-base

demo: $(VENV)/.stamp-base
	$(VENV)/bin/admkit demo

lint: $(VENV)/.stamp-test
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

test: $(VENV)/.stamp-test
	$(MAKE) lint
	$(PY) -m pytest

clean:
	rm -rf $(VENV) build src/*.egg-info
