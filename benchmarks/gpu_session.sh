#!/usr/bin/env bash
# Everything that needs a GPU, in one go: CUDA exactness tests, then the kernel and engine benchmarks.
#   bash benchmarks/gpu_session.sh [OUT_DIR]        (liger-kernel wheel, if wanted, in .whl/)
# Logs and result tables land in OUT_DIR (default: benchmarks/results/).
set -uo pipefail
out=${1:-${OUT:-benchmarks/results}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=".:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/device.txt"
# Tests: one pinned Triton config (autotuning every tiny test shape would only cost compile time).
ATESD_TRITON_CONFIG=64,128,64,8,3 python3 -m pytest tests/kernels -q -x -p no:cacheprovider 2>&1 | tee "$out/tests-cuda.log"
ATESD_BENCH_OUT="$out/kernels-cuda.md" python3 -m pytest benchmarks/bench_kernels.py --benchmark -q -s \
  -p no:cacheprovider 2>&1 | tee "$out/bench-kernels.log"
if [ -f benchmarks/bench_prefix_sharing.py ]; then
  python3 -m pytest benchmarks/bench_prefix_sharing.py --benchmark -q -s -p no:cacheprovider 2>&1 \
    | tee "$out/bench-prefix.log"
fi
# Rollouts (issue 16): Qwen3-1.7B shape, 32 prompts x 1024 new tokens, old loop vs compiled static loop vs generate
python3 -m benchmarks.bench_rollout --gpu --out "$out/rollout-cuda.md" 2>&1 | tee "$out/bench-rollout.log"
# One engine.train step at the Qwen3-1.7B shape (random weights, 32 prompts x 1024 new tokens), split by phase
python3 -m benchmarks.bench_train_step --shape 1.7b --out "$out/train-step-cuda.md" 2>&1 | tee "$out/bench-train-step.log"
