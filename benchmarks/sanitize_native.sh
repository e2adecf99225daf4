#!/usr/bin/env bash
# ASan + UBSan run of the native CPU kernel's tests (docs/native.md).
#
#   bash benchmarks/sanitize_native.sh            # from the repository root; extra args go to pytest
#
# Builds kernels/csrc with -fsanitize=address,undefined (and -Werror) into build/sanitize/asan, nested one level
# deeper than the build/*/ trees that kernels/_native.py searches, so that ordinary runs never pick it up; the
# tests load it through ATESD_NATIVE_LIBRARY. CPython itself is not instrumented, so the ASan runtime must be
# preloaded; leak detection is off because CPython keeps its interned objects alive until exit by design.
# UBSan aborts on the first finding (halt_on_error) and ASan errors abort by default, so a clean run is exit 0.
set -euo pipefail
cd "$(dirname "$0")/.."

BUILD=build/sanitize/asan
PYTHON=${PYTHON:-python3}
CXX=${CXX:-g++}
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DATESD_SANITIZE=ON -DATESD_WERROR=ON \
  -DCMAKE_CXX_COMPILER="$CXX" -DPython_EXECUTABLE="$(command -v "$PYTHON")" >/dev/null
cmake --build "$BUILD"

export ATESD_NATIVE_LIBRARY="$PWD/$BUILD/_atesd_native.so"
export LD_PRELOAD="$("$CXX" -print-file-name=libasan.so):$("$CXX" -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# The library is instrumented, and it is the one the tests get (not a build/*/ tree of an ordinary build).
nm -D "$ATESD_NATIVE_LIBRARY" | grep -q __asan_report_load && nm -D "$ATESD_NATIVE_LIBRARY" | grep -q __ubsan_handle
"$PYTHON" -c 'import os; from atesd import kernels; from atesd.kernels import _native
assert kernels.backend_for("cpu") == "native" and _native.LIBRARY == os.environ["ATESD_NATIVE_LIBRARY"], _native.LIBRARY
print("sanitized kernel:", _native.LIBRARY)'
# the op's contract tests too (NaN / inf inputs, extreme temperatures), without their Triton-interpreter cases
export TRITON_INTERPRET=0
"$PYTHON" -m pytest tests/kernels/test_native.py tests/kernels/test_op.py tests/kernels/test_contract.py -q \
  -p no:cacheprovider "$@"
