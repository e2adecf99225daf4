# Two commands do all set-up on a fresh machine: `make run` (the main job) and `make test` (the test suite).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP := .setup.stamp

.PHONY: setup run test bench lint
$(STAMP): pyproject.toml
	# torch is pinned on the command line so pip takes the CPU wheel and never a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0 -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(PYTHON) -m engine.train

test: setup
	$(PYTHON) -m pytest -q

bench: setup
	$(PYTHON) -m pytest benchmarks/ --benchmark -q -s

lint: setup
	ruff check .
