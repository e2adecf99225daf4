# Shared by benchmarks/gpu_session.sh and gpu_session_2.sh (sourced, from the repository root): the environment,
# the per-step `timeout` runner with its summary table, and the device/versions step.
#
# In:  GPU_SESSION_DRY (1: CPU dry run at tiny shapes), GPU_SESSION_BUDGET (seconds, default 530), PYTHON
#      (default python3), OUT (default benchmarks/results/gpu-session), TMPDIR.
# Out: $PY, $DRY, $BUDGET, $out, $summary; functions step, select_steps, versions, start_summary.
set -uo pipefail

DRY=${GPU_SESSION_DRY:-0}
PY=${PYTHON:-python3}
BUDGET=${GPU_SESSION_BUDGET:-530}
out=${OUT:-benchmarks/results/gpu-session}
summary="$out/summary.md"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 TRITON_DEFAULT_FP_FUSION=1
# liger-kernel is not in the device image: the carried wheel (.whl/, `bash benchmarks/gpu_session.sh --prepare`)
site="${TMPDIR:-/tmp}/atesd-gpu-session-site"
if ls .whl/liger_kernel-*.whl >/dev/null 2>&1 && ! "$PY" -c "import liger_kernel" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    .whl/liger_kernel-*.whl && export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"  # the checkout: atesd/__init__.py maps kernels/, engine/, ...
if [ "$DRY" = 1 ]; then
  export GPU_SESSION_DRY=1 TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
fi
export PY

start_summary() {  # start_summary COMMAND
  {
    echo "# GPU session, $(date -u +%Y-%m-%dT%H:%MZ)$([ "$DRY" = 1 ] && echo ', CPU dry run')"
    echo
    echo "\`$1\` (budget ${BUDGET} s); one row per step as it ends."
    echo
    echo "| step | outcome | seconds | output |"
    echo "|---|---|---|---|"
  } >"$summary"
}

# step NAME CAP LOG TABLE -- CMD...: CMD (a program or an exported function) under `timeout` (CAP seconds, or what
# is left of the budget), its output teed to $out/LOG (appended to when an earlier step of this run wrote that LOG:
# steps may share one, since the device tool brings back at most 8 files from $OUT); one summary row: ok, failed
# (rc), timed out, or skipped when too little time is left.
logs_written=" "
step() {
  local name=$1 cap=$2 log=$3 table=$4
  shift 5
  local left=$((BUDGET - SECONDS - 5)) t0=$SECONDS rc outcome append=""
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 10 ]; then
    echo "| $name | skipped: ${left} s of the budget left | 0 | |" >>"$summary"
    return
  fi
  case $logs_written in
    *" $log "*) append=-a && echo "=== $name" >>"$out/$log" ;;  # a shared log: where this step's part begins
    *) logs_written+="$log " ;;
  esac
  echo "=== $name (limit ${limit} s, ${SECONDS} s elapsed)"
  timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" 2>&1 | tee $append "$out/$log"  # bash -c: functions too
  rc=${PIPESTATUS[0]}
  case $rc in
    0) outcome=ok ;;
    124 | 137) outcome="timed out after ${limit} s" ;;
    *) outcome="failed (rc $rc)" ;;
  esac
  echo "| $name | $outcome | $((SECONDS - t0)) | $log $table |" >>"$summary"
}

# select_steps LIST KEY=NAME...: the names of the steps LIST (comma-separated keys or names) selects, in its order,
# one a line; a one-line error naming the unknown or repeated entry (return 2) otherwise.
select_steps() {
  local list=$1 token pair chosen=" " found known=""
  shift
  for pair in "$@"; do
    known+="${known:+, }${pair%%=*}$([ "${pair%%=*}" = "${pair#*=}" ] || echo " (${pair#*=})")"
  done
  [ -n "$list" ] || { echo "GPU_SESSION_STEPS is empty (known steps: $known)" >&2; return 2; }
  for token in ${list//,/ }; do
    found=""
    for pair in "$@"; do
      if [ "$token" = "${pair%%=*}" ] || [ "$token" = "${pair#*=}" ]; then found=${pair#*=}; fi
    done
    if [ -z "$found" ]; then
      echo "GPU_SESSION_STEPS: unknown step '$token' (known steps: $known)" >&2
      return 2
    fi
    case $chosen in *" $found "*) echo "GPU_SESSION_STEPS: step '$token' listed twice" >&2; return 2 ;; esac
    chosen+="$found "
    echo "$found"
  done
}

versions() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null \
    || echo "no nvidia-smi"
  "$PY" -c '
import importlib.metadata as md, platform, torch
print(f"python {platform.python_version()}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
      f"cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
for name in ("triton", "transformers", "peft", "liger-kernel", "pytest", "pytest-benchmark"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
from atesd.kernels import describe_backend
print("op backend:", describe_backend("cuda" if torch.cuda.is_available() else "cpu"))
'
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown); $(nproc --all) CPUs"
}
export -f versions
