#!/usr/bin/env bash
# `make run` and `make test` from a fresh clone with an externally-managed Python (PEP 668), as a new user on
# stock Debian/Ubuntu would run them (issue 18 item 8, end to end; the fast part is in `make test`:
# tests/engine/test_reliability_venv.py). Takes minutes: installs torch and the package into the clone's .venv,
# builds the native kernel, trains the embedded default, runs the whole suite.
#
#   bash .ci/fresh_clone_pep668.sh                  # with /usr/bin/python3 if it is externally managed, else a
#                                                   # stand-in built by .ci/externally_managed_python.py
#   PYTHON=/path/to/python3 bash .ci/fresh_clone_pep668.sh
#
# Clones the committed HEAD of this checkout into a temporary directory (removed at the end unless KEEP=1).
# Needs the packages reachable by pip (an index or the machine's pip configuration) and make, git, a C++ compiler.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$work"' EXIT
start=$(date +%s)

is_managed() { "$1" -c 'import os, sys, sysconfig
sys.exit(0 if sys.prefix == sys.base_prefix and os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")) else 1)'; }

python=${PYTHON:-}
if [ -z "$python" ]; then
    if [ -x /usr/bin/python3 ] && is_managed /usr/bin/python3; then
        python=/usr/bin/python3
    else
        python=$(python3 "$repo/.ci/externally_managed_python.py" "$work/system-python")
    fi
fi
is_managed "$python" || { echo "FAIL: $python is not an externally-managed Python" >&2; exit 1; }
echo "== externally-managed Python: $python ($("$python" --version))"

echo "== a bare pip install is refused"
if "$python" -m pip --version >/dev/null 2>&1; then
    if "$python" -m pip install --dry-run --no-deps pyyaml >"$work/pip.log" 2>&1; then
        echo "FAIL: pip installed into the externally-managed Python" >&2; exit 1
    fi
    grep -q externally-managed-environment "$work/pip.log" && echo "   refused: externally-managed-environment"
else
    echo "   (no pip in this Python at all: nothing can be installed into it)"
fi

echo "== fresh clone of $(git -C "$repo" rev-parse --short HEAD)"
git clone -q "$repo" "$work/atesd"
cd "$work/atesd"

echo "== make run"
t=$(date +%s)
make run PYTHON="$python" 2>&1 | tr '\r' '\n' | { grep -a -E "accuracy|run directory|^error|Error" || true; }
echo "   make run: $(( $(date +%s) - t )) s"

echo "== make test"
t=$(date +%s)
make test PYTHON="$python" 2>&1 | tail -n 5
echo "   make test: $(( $(date +%s) - t )) s"

echo "== the clone holds nothing but .venv, build/ and runs/ of make run"
git status --porcelain --ignored | grep -v -E '^!! (\.venv/|build/|runs/|\.pytest_cache/|\.hypothesis/|\.benchmarks/)' \
    | grep -v -E '__pycache__|\.egg-info' && { echo "FAIL: files left in the clone" >&2; exit 1; }
echo "== OK in $(( $(date +%s) - start )) s"
