# Two commands for a fresh machine: `make demo` (the whole pipeline on the bundled sample)
# and `make test` (the test suite). Both create .venv and install into it when missing.
PYTHON ?= python3
VENV ?= .venv
# The torch build to install first; the default is a real release (CPU wheel where one is
# provided locally, CUDA from PyPI elsewhere). Override e.g. TORCH='torch==2.13.0+cu128'.
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Every process (tests, the deepspeed launcher and its ranks) finds this venv's tools (ninja, deepspeed)
# first, and DeepSpeed's JIT-built ops live in the venv: another venv or PATH never rebuilds them.
export PATH := $(abspath $(VENV))/bin:$(PATH)
export TORCH_EXTENSIONS_DIR := $(abspath $(VENV))/torch_extensions

.PHONY: install demo test test-all bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	bash examples/demo.sh

test: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	bash benchmarks/run_all.sh

clean:
	rm -rf $(VENV) out runs
