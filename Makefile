# Two commands do all set-up on a fresh machine: `make run` (the main job) and `make test` (the test suite).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP := .setup.stamp

.PHONY: setup run test bench lint
$(STAMP): pyproject.toml
	# torch is pinned on the command line so pip takes the CPU wheel and never a multi-GB CUDA build; the native
	# kernel (CMakeLists.txt) is then built against that torch, without build isolation.
	$(PIP) install -q torch==2.13.0 "scikit-build-core>=0.10" cmake ninja
	$(PIP) install -q --no-build-isolation -e ".[dev]"
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
