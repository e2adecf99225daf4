# Two commands do all set-up on a fresh machine: `make run` (the main job) and `make test` (the test suite).
# Everything is installed into a project virtual environment, .venv (PEP 668: a stock Debian/Ubuntu Python refuses
# `pip install` outside one); VENV=<dir> picks another, PYTHON=<interpreter> the Python that creates it.
# Tested from a fresh clone with an externally-managed Python: tests/engine/test_reliability_venv.py (fast part,
# in `make test`) and .ci/fresh_clone_pep668.sh (make run + make test end to end).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.atesd-setup.stamp

.PHONY: setup editor run test bench lint clean-venv
$(PY):
	@$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); echo "make: '$(PYTHON) -m venv $(VENV)' failed; on Debian/Ubuntu \
	install the venv module first: sudo apt install python3-venv" >&2; exit 1; }

$(STAMP): pyproject.toml CMakeLists.txt $(wildcard kernels/csrc/*) | $(PY)
	# torch is pinned on the command line so pip takes the CPU wheel and never a multi-GB CUDA build; the native
	# kernel (CMakeLists.txt) is then built against that torch, without build isolation.
	$(PY) -m pip install -q torch==2.13.0 "scikit-build-core>=0.10" cmake ninja
	$(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP) editor

# Editors and type checkers read files, not import hooks: they cannot follow atesd/__init__.py's __path__ (the checkout's
# kernels/, engine/, controller/ as atesd.*) nor the editable install's redirect. build/editor/atesd is the same
# package as links they can read (pyproject.toml's [tool.pyright] extraPaths; docs/engine.md, "The house").
editor:
	@mkdir -p build/editor/atesd
	@ln -sfn ../../../atesd/__init__.py build/editor/atesd/__init__.py
	@for p in kernels engine controller; do ln -sfn ../../../$$p build/editor/atesd/$$p; done

run: setup
	$(PY) -m engine.train

test: setup
	$(PY) -m pytest -q

# One line per benchmark as it finishes (-v), the slowest listed at the end, and the total time: 19 min on the
# 2-core CPU (2026-11-26, load average 4-6 from other jobs; 29 benchmarks, the CPU kernel suite is 95% of it);
# the CUDA suites skip without a GPU.
bench: setup
	@echo "make bench: all benchmarks/ suites, about 20 min on a 2-core CPU; started $$(date '+%H:%M:%S')"
	@start=$$(date +%s); $(PY) -m pytest benchmarks/ --benchmark -v -s --durations=10; status=$$?; \
	echo "make bench: finished in $$(( $$(date +%s) - start )) s"; exit $$status

lint: setup
	$(PY) -m ruff check .

clean-venv:
	rm -rf $(VENV)
