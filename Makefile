# Two commands do all set-up on a fresh machine: `make run` (the main job) and `make test` (the test suite).
# Everything is installed into a project virtual environment, .venv (PEP 668: a stock Debian/Ubuntu Python refuses
# `pip install` outside one); VENV=<dir> picks another, PYTHON=<interpreter> the Python that creates it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.atesd-setup.stamp

.PHONY: setup run test bench lint clean-venv
$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml CMakeLists.txt $(wildcard kernels/csrc/*) | $(PY)
	# torch is pinned on the command line so pip takes the CPU wheel and never a multi-GB CUDA build; the native
	# kernel (CMakeLists.txt) is then built against that torch, without build isolation.
	$(PY) -m pip install -q torch==2.13.0 "scikit-build-core>=0.10" cmake ninja
	$(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(PY) -m engine.train

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m pytest benchmarks/ --benchmark -q -s

lint: setup
	$(PY) -m ruff check .

clean-venv:
	rm -rf $(VENV)
