#!/usr/bin/env bash
# The GPU session (issue 23): one command of at most 9 minutes on an H200, the most important facts first.
#
# How a lent session runs it (check the device tool's `status` first; it costs nothing):
#   1. here, once (liger-kernel is not in the device image; .whl/ is git-ignored, so it must be carried):
#        bash benchmarks/gpu_session.sh --prepare       # = pip download liger-kernel==0.8.5 --no-deps -d .whl/
#   2. the device tool, one call:
#        run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=570)
#      The script ends itself within GPU_SESSION_BUDGET seconds (default 530) and writes every table under $OUT
#      as soon as it exists; the tool brings $OUT back (8 files, its limit): summary.md (each step's outcome and
#      time), device.md, kernels.md, profile.md, workspace.md, train-step-static.md, train-step.md, and session.log
#      (every step's output after the device step's, each part headed "=== step").
#   3. give_back (unless rerunning at once), then copy the tables into benchmarks/RESULTS.md with the device, the
#      date, the versions (device.md) and the exact command (summary.md's first line).
#
# A short session: GPU_SESSION_STEPS picks the steps and their order (comma-separated keys or names, below), and
# GPU_SESSION_BUDGET must end the command before the tool's timeout_s does. A machine takes a minute or more to
# start, out of the same device time, so with ~4 minutes left (the least a machine starts with), the rows path
# (kernels/triton_kl_rows.py, never timed yet) against the tile path and Liger, then its exactness:
#        run(command="GPU_SESSION_STEPS=a,c,b GPU_SESSION_BUDGET=200 bash benchmarks/gpu_session.sh",
#            carry=[".whl"], timeout_s=220)
#   or the per-kernel profile of the tile path:
#        run(command="GPU_SESSION_STEPS=a,c-profile GPU_SESSION_BUDGET=140 bash benchmarks/gpu_session.sh",
#            timeout_s=160)
#   and with ~5-6 minutes, the op's table too (Liger's wheel carried; c reuses c-profile's compiled kernels):
#        run(command="GPU_SESSION_STEPS=a,c-profile,c GPU_SESSION_BUDGET=230 bash benchmarks/gpu_session.sh",
#            carry=[".whl"], timeout_s=250)
#   and the training step alone (its rollouts uncompiled first, so a phase split lands however long compiling takes):
#        run(command="GPU_SESSION_STEPS=a,s,d GPU_SESSION_BUDGET=520 bash benchmarks/gpu_session.sh", timeout_s=560)
#
# Steps (key, name), each under its own `timeout` (a step that fails or times out is marked in summary.md; the next
# one runs); the default is all of them in this order (GPU_SESSION_STEPS=a,b,c,c-profile,w,s,d):
#   a  a-device     device and versions                                          device.md         cap 30 s
#   b  b-exactness  CUDA exactness of the op: tests/kernels/test_cuda_exactness.py (bf16 and fp32, V=151936, clip,
#                   beta 0 and 0.5, masked rows, a trainable head, extreme logits, NaN/inf rows) under one pinned
#                   Triton config (no autotuning: ~17 kernel compiles), on the tile path and on the rows path
#                   (kernels/triton_kl_rows.py, never run on a GPU before)       session.log       cap 150 s
#   c  c-kernels    the op (tile path, then rows path: ours-rows at 512 MiB) vs Liger's LigerFusedLinearJSDLoss
#                   (beta 0) vs chunked torch at N=8192, H=4096,
#                   V=151936, bf16, T 1.1, clip 0.06, frozen then trainable head: ms, tokens/s, peak extra memory,
#                   TFLOP/s on each one's own FLOP count and on the 6NVH yardstick, % of the bf16 matmul peak
#                   measured in the same run; rows written as measured (benchmarks/bench_kernels.py)
#                                                                                kernels.md        cap 200 s
#   c-profile       the op's kernels one by one at the same shape (benchmarks/profile_op.py): ms, TFLOP/s and %
#                   of peak per kernel, the autotuner's choice, registers, spills, waves, PTX counts; the default
#                   workspace backward (_dz_kernel vs its cuBLAS products), the fused one (its atomics
#                   isolated), the rows path (its cuBLAS products vs its two memory-bound kernels, GB/s),
#                   a logits-only control, the epilogue against the matmul (~26 autotuning
#                   compiles, ~15 s of timed runs; issue 23 asks which kernel)   profile.md        cap 120 s
#   w  w-workspace  the op's backward, fused (atomics) vs the workspace backward at 128-1024 MiB
#                   (benchmarks/bench_bwd_workspace.py): ms, tokens/s, peak memory, difference to the fused
#                   gradients; the 2026-12-04 18:07 profile put the fused backward's atomics at 8-19% of peak
#                                                                                workspace.md      cap 120 s
#   s  s-train-step-static  the step below with --rollout static: the same decoder uncompiled (the 2026-12-04
#                   sessions' compiled first step ran past 3.5 minutes inside its first rollout)
#                                                                                train-step-static.md  cap 240 s
#   d  d-train-step one engine.train step at the Qwen3-1.7B shape by phase, graphs compiled per phase (step 2's
#                   are recompiles), the rollout engine and attention that ran (benchmarks/bench_train_step.py;
#                   step 1's figures are written before step 2 runs; each phase's start and end is logged)
#                                                                                train-step.md     the rest
# ATESD_TRITON_BWD_WORKSPACE_MIB, when set for the command, reaches every step (b, c and d then run the op's
# workspace backward; w sets it per row itself).
# Rollouts and prefix sharing: benchmarks/gpu_session_2.sh, for a later lent session.
#
# CPU dry run (tests/test_gpu_session.py runs it in CI): GPU_SESSION_DRY=1 OUT=/tmp/x bash benchmarks/gpu_session.sh
# runs every step on the CPU at tiny shapes (Triton in its interpreter), so the script cannot break on a typo.
cd "$(dirname "$0")/.." || exit 1

if [ "${1:-}" = "--prepare" ]; then  # on the CPU machine: the wheel the device image lacks, into .whl/
  exec "${PYTHON:-python3}" -m pip download --no-deps --only-binary=:all: -d .whl liger-kernel==0.8.5
fi

source benchmarks/gpu_session_lib.sh
if [ "$DRY" = 1 ]; then
  KERNEL_SHAPE=64x32x300 ROUNDS=1 TRAIN_SHAPE=smoke WORKSPACE_MIBS=0,0.02
else
  KERNEL_SHAPE=8192x4096x151936 ROUNDS=5 TRAIN_SHAPE=1.7b WORKSPACE_MIBS=0,128,256,512,1024
fi

exactness() {  # one pinned config: autotuning every variant would cost ~20 compiles each
  ATESD_TRITON_CONFIG=64,128,64,8,4 "$PY" -m pytest tests/kernels/test_cuda_exactness.py -q -rA \
    -p no:cacheprovider -p no:randomly
}
export -f exactness

steps=$(select_steps "${GPU_SESSION_STEPS-a,b,c,c-profile,w,s,d}" a=a-device b=b-exactness c=c-kernels \
  c-profile=c-profile w=w-workspace s=s-train-step-static d=d-train-step) || exit 2
start_summary "${GPU_SESSION_STEPS+GPU_SESSION_STEPS=$GPU_SESSION_STEPS }bash benchmarks/gpu_session.sh"
for name in $steps; do
  case $name in
    a-device) step a-device 30 device.md "" -- versions ;;
    b-exactness) step b-exactness 150 session.log "" -- exactness ;;
    c-kernels) step c-kernels 200 session.log kernels.md -- "$PY" -m benchmarks.bench_kernels --shapes "$KERNEL_SHAPE" \
      --impls ours,ours-rows,liger,chunked --heads frozen,trainable --rounds "$ROUNDS" --out "$out/kernels.md" ;;
    c-profile) step c-profile 120 session.log profile.md -- "$PY" -m benchmarks.profile_op --shape "$KERNEL_SHAPE" \
      --rounds "$ROUNDS" --out "$out/profile.md" ;;
    w-workspace) step w-workspace 120 session.log workspace.md -- "$PY" -m benchmarks.bench_bwd_workspace \
      --shape "$KERNEL_SHAPE" --rounds "$ROUNDS" --mib "$WORKSPACE_MIBS" --out "$out/workspace.md" ;;
    s-train-step-static) step s-train-step-static 240 session.log train-step-static.md -- "$PY" -m \
      benchmarks.bench_train_step --shape "$TRAIN_SHAPE" --rollout static --out "$out/train-step-static.md" ;;
    d-train-step) step d-train-step 600 session.log train-step.md -- "$PY" -m benchmarks.bench_train_step \
      --shape "$TRAIN_SHAPE" --out "$out/train-step.md" ;;
  esac
done
echo "total ${SECONDS} s" | tee -a "$summary"
