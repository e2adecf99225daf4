#!/usr/bin/env bash
# The second GPU session (issue 23): rollouts and prefix sharing at the Qwen3-1.7B shape, one command of at most
# 9 minutes on an H200, for a session lent a GPU after benchmarks/gpu_session.sh has run.
#
# How a lent session runs it (check the device tool's `status` first; it costs nothing):
#   run(command="bash benchmarks/gpu_session_2.sh", carry=[".whl"], timeout_s=570)
# ($OUT comes back: summary.md, device.md, rollout.md (+ rollout.log), prefix-sharing.log), then give_back, and
# copy the tables into benchmarks/RESULTS.md (sections 3 and 10) with device, date, versions and this command.
#
# Steps, each under its own `timeout`:
#   a. device and versions                                                         device.md            cap 30 s
#   b. rollouts: the HF loop vs the compiled static-cache loop vs model.generate, 32 prompts x 1024 new tokens,
#      tokens/s and whether the compiled loop sampled the HF loop's tokens (benchmarks/bench_rollout.py --gpu)
#                                                                                 rollout.md           cap 300 s
#   c. the teacher pass with and without prefix sharing, FlexAttention tree mask (the attention that ran is
#      printed on each line: a FlexAttention failure shows as "dense (flex failed: ...)")
#      (benchmarks/bench_prefix_sharing.py)                                       prefix-sharing.log   the rest
#
# CPU dry run (tests/test_gpu_session.py, in CI): GPU_SESSION_DRY=1 OUT=/tmp/x bash benchmarks/gpu_session_2.sh
cd "$(dirname "$0")/.." || exit 1
source benchmarks/gpu_session_lib.sh
if [ "$DRY" = 1 ]; then
  # not the compiled loop: inductor's CPU compile alone would take ~30 s (tests/engine/test_rollout_static.py
  # runs it through this benchmark's code)
  ROLLOUT_ARGS="--shape smoke --device cpu --dtype float32 --impls hf,static,generate" PREFIX_SHAPES=small
else
  ROLLOUT_ARGS="--shape 1.7b" PREFIX_SHAPES=1.7b
fi

prefix_sharing() {
  BENCH_PREFIX_SHAPES=$PREFIX_SHAPES "$PY" -m pytest benchmarks/bench_prefix_sharing.py --benchmark -q -s \
    -p no:cacheprovider -p no:randomly --benchmark-disable-gc
}
export -f prefix_sharing
export PREFIX_SHAPES

start_summary "bash benchmarks/gpu_session_2.sh"
step a-device 30 device.md "" -- versions
# shellcheck disable=SC2086  # ROLLOUT_ARGS is a list of words
step b-rollout 300 rollout.log rollout.md -- "$PY" -m benchmarks.bench_rollout --gpu $ROLLOUT_ARGS \
  --out "$out/rollout.md"
step c-prefix-sharing 600 prefix-sharing.log "" -- prefix_sharing
echo "total ${SECONDS} s" | tee -a "$summary"
