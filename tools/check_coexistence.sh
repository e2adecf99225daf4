#!/usr/bin/env bash
# This project (distribution `atesd`) beside Hugging Face's `kernels` distribution in one environment.
#
#   bash tools/check_coexistence.sh            # the whole matrix (~10 min: three fresh venvs with torch)
#   bash tools/check_coexistence.sh --quick    # the core case (one venv: (1), and (3) without the engine run; CI)
#
# Every venv is fresh (python -m venv) with torch==2.13.0 (the CPU wheel; pinned so pip never takes a CUDA
# build), this project as a non-editable wheel built with --no-build-isolation against that torch, and HF `kernels`
# (KERNELS_SPEC, default the newest). Checks, each after every install / uninstall:
#   hf:    `from kernels import get_kernel` imports Hugging Face's function; AutoModelForCausalLM.from_pretrained
#          loads a model (transformers probes `kernels` at load time: the failure mode of issue 17)
#   atesd: `from atesd.kernels import fused_linear_kl` runs on CPU (native backend), and
#          `python -m atesd.engine.train --steps 1` runs, its run.log naming the loss backend
# Matrix: (1) atesd, then kernels; uninstall kernels -> atesd intact; reinstall, uninstall atesd -> kernels intact.
# (2) kernels first, then atesd. (3) a checkout on sys.path (its root as working directory, `python -m
# engine.train`) beside HF kernels: the checkout's kernels/ folder defers to HF's when imported by its bare name.
# Everything is written under one temporary directory, removed at the end.
set -euo pipefail

QUICK=0
[[ "${1:-}" == "--quick" ]] && QUICK=1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
KERNELS_SPEC=${KERNELS_SPEC:-kernels}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/atesd-coexist.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_INPUT=1
START=$SECONDS

say() { printf '[%4ds] %s\n' "$((SECONDS - START))" "$*"; }
pipq() { "$1/bin/python" -m pip install -q "${@:2}"; }

new_venv() {  # fresh venv with the pinned CPU torch
    "$PYTHON" -m venv "$1"
    pipq "$1" "$TORCH_SPEC" numpy
    say "venv $(basename "$1"): $("$1/bin/python" -c 'import torch; print("torch", torch.__version__)')"
}

check_hf() {  # $1 venv, $2 working directory
    (cd "$2" && "$1/bin/python" - "$ROOT/engine/lab/assets/tiny-qwen3" <<'EOF'
import sys
import importlib.metadata as md
from kernels import get_kernel  # Hugging Face's function, not this project's folder
import kernels
owner = md.distribution("kernels").locate_file("kernels/__init__.py")
assert str(owner) == kernels.__file__, (kernels.__file__, str(owner))  # the distribution's own module
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
print(f"hf ok: kernels {md.version('kernels')} at {kernels.__file__}; get_kernel={get_kernel.__module__}; "
      f"from_pretrained -> {type(model).__name__}")
EOF
    )
}

check_atesd() {  # $1 venv, $2 working directory, $3 how to run the engine ("atesd.engine.train" or "engine.train",
                 # "" to skip it)
    (cd "$2" && "$1/bin/python" - <<'EOF'
import torch
from atesd.kernels import describe_backend, fused_linear_kl
hs = torch.randn(6, 8, requires_grad=True)
loss = fused_linear_kl(hs, torch.randn(6, 8), torch.randn(50, 8), temperature=1.1, clip=0.05)
loss.backward()
assert torch.isfinite(loss) and hs.grad is not None
print(f"atesd ok: fused_linear_kl = {loss.item():.4f}; {describe_backend('cpu')}")
EOF
    )
    [[ -z "$3" ]] && return 0
    local run="$WORK/run-$RANDOM"
    (cd "$2" && "$1/bin/python" -m "$3" --steps 1 --batch-size 2 --num-samples 2 --max-new-tokens 16 \
        --eval-problems 4 --task-option size=20 --no-progress --output-dir "$run" > "$run.out" 2>&1) \
        || { tail -30 "$run.out"; return 1; }
    say "engine ok: python -m $3 --steps 1 -> $(grep -o 'loss backend: [a-z]*' "$run/run.log")"
}

# the project's source as committed or edited (tracked files), built outside the checkout
mkdir -p "$WORK/src"
git -C "$ROOT" ls-files -z | (cd "$ROOT" && xargs -0 tar -cf -) | tar -C "$WORK/src" -xf -
new_venv "$WORK/v1"
pipq "$WORK/v1" "scikit-build-core>=0.10" cmake ninja
"$WORK/v1/bin/python" -m pip wheel -q --no-build-isolation --no-deps "$WORK/src" -w "$WORK/dist"
WHEEL=$(ls "$WORK"/dist/atesd-*.whl)
say "built $(basename "$WHEEL")"
mkdir -p "$WORK/cwd"

say "(1) atesd wheel first, then HF kernels"
pipq "$WORK/v1" "$WHEEL"
pipq "$WORK/v1" "$KERNELS_SPEC"
check_hf "$WORK/v1" "$WORK/cwd"
check_atesd "$WORK/v1" "$WORK/cwd" atesd.engine.train
if [[ $QUICK == 0 ]]; then
    say "(1b) uninstall HF kernels: atesd intact"
    "$WORK/v1/bin/python" -m pip uninstall -q -y kernels
    check_atesd "$WORK/v1" "$WORK/cwd" atesd.engine.train
    say "(1c) reinstall HF kernels, uninstall atesd: kernels intact"
    pipq "$WORK/v1" "$KERNELS_SPEC"
    "$WORK/v1/bin/python" -m pip uninstall -q -y atesd
    check_hf "$WORK/v1" "$WORK/cwd"

    say "(2) HF kernels first, then the atesd wheel"
    new_venv "$WORK/v2"
    pipq "$WORK/v2" "$KERNELS_SPEC" transformers
    check_hf "$WORK/v2" "$WORK/cwd"
    pipq "$WORK/v2" "$WHEEL"
    check_hf "$WORK/v2" "$WORK/cwd"
    check_atesd "$WORK/v2" "$WORK/cwd" atesd.engine.train
    "$WORK/v2/bin/python" -m pip uninstall -q -y atesd
    check_hf "$WORK/v2" "$WORK/cwd"
    VENV_CHECKOUT="$WORK/v2"
    pipq "$VENV_CHECKOUT" "$WHEEL"  # its dependencies stay for the checkout case
    "$VENV_CHECKOUT/bin/python" -m pip uninstall -q -y atesd
else
    "$WORK/v1/bin/python" -m pip uninstall -q -y atesd
    VENV_CHECKOUT="$WORK/v1"
fi

say "(3) a checkout (working directory = its root, not installed) beside HF kernels"
check_hf "$VENV_CHECKOUT" "$WORK/src"
# the checkout's native kernel: the wheel build left it in the source tree's build/<wheel tag>/, where
# kernels/_native.py looks (as after `make setup`)
ls "$WORK"/src/build/*/_atesd_native*.so > /dev/null
check_atesd "$VENV_CHECKOUT" "$WORK/src" "$([[ $QUICK == 0 ]] && echo engine.train)"  # --quick: the op only
say "all coexistence checks passed"
