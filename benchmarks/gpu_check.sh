#!/usr/bin/env bash
# One-shot GPU check (docs/DESIGN.md §8 machine: torch 2.11, triton 3.6, Python 3.12, no network).
#   benchmarks/gpu_check.sh OUTDIR             on the lent GPU (one command of at most 10 minutes)
#   benchmarks/gpu_check.sh --dry-run OUTDIR   anywhere, in about a minute: the same stages, limits
#                                              and files at tiny sizes on CPU (TRITON_INTERPRET=1);
#                                              tests/test_gpu_check.py runs it in `make test`
#   benchmarks/gpu_check.sh --budget           print the stage limits and their total, run nothing
#   GPU_CHECK_ONLY="tests bench" benchmarks/gpu_check.sh OUTDIR   only these stages (a rerun)
# Stages, most valuable first (a limit that cuts the run cuts the tail):
#   environment, build (setup.py; CUDA kernels when the toolkit matches torch's CUDA), GPU tests
#   (the "cuda" and "triton" backends vs the reference on CUDA tensors; junit log tests.xml),
#   the queue step (q = 2^20), the comparison benchmark without the sweep, a per-kernel profile
#   (benchmarks/profile_steps.py), then extras (tile tuning). The summary is printed after every stage's own limit has expired at the latest.
# Each stage runs under `timeout -s INT LIMIT` (SIGINT: pytest and Python print what they have)
# plus KILL_GRACE seconds before SIGKILL; the limits add up to at most BUDGET_S (480 s), checked
# below before anything runs. Everything the script writes goes under OUTDIR.
set -uo pipefail
DRY=0 BUDGET_ONLY=0
case "${1:-}" in
  --dry-run) DRY=1; shift ;;
  --budget) BUDGET_ONLY=1 ;;
esac

# Stage limits (seconds) in running order; the environment variables override them.
BUDGET_S=480
KILL_GRACE=5
LIMIT_ENV=${ENV_TIMEOUT:-15}
LIMIT_BUILD=${BUILD_TIMEOUT:-135}  # the H200 built in 57 s (2026-12-04)
LIMIT_TESTS=${TEST_TIMEOUT:-130}
LIMIT_QUEUE=${QUEUE_TIMEOUT:-45}
LIMIT_BENCH=${BENCH_TIMEOUT:-65}
LIMIT_PROFILE=${PROFILE_TIMEOUT:-30}
LIMIT_EXTRAS=${EXTRAS_TIMEOUT:-25}
STAGES="env:$LIMIT_ENV build:$LIMIT_BUILD tests:$LIMIT_TESTS queue:$LIMIT_QUEUE bench:$LIMIT_BENCH profile:$LIMIT_PROFILE extras:$LIMIT_EXTRAS"
TOTAL=0
for s in $STAGES; do TOTAL=$((TOTAL + ${s#*:} + KILL_GRACE)); done
echo "stage limits (s): $STAGES, +${KILL_GRACE} s grace each: total $TOTAL s of a $BUDGET_S s budget"
if [ "$TOTAL" -gt "$BUDGET_S" ]; then
  echo "the stage limits add up to $TOTAL s, over the $BUDGET_S s budget: lower a *_TIMEOUT"; exit 2
fi
[ "$BUDGET_ONLY" = 1 ] && exit 0

OUT=${1:?usage: benchmarks/gpu_check.sh [--dry-run] OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ "$DRY" = 1 ]; then export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""; else unset TRITON_INTERPRET; fi
ONLY=" ${GPU_CHECK_ONLY:-env build tests queue bench profile extras} "
want() { case "$ONLY" in *" $1 "*) return 0 ;; *) echo "== $1: skipped (GPU_CHECK_ONLY)"; return 1 ;; esac; }

SECONDS=0
stage() { echo "== [$SECONDS s] $*"; }
# run NAME LIMIT LOG COMMAND...: COMMAND under its limit, output into OUT/LOG; prints its exit status.
run() {
  local name=$1 limit=$2 log=$3; shift 3
  timeout -s INT -k "$KILL_GRACE" "$limit" "$@" >"$OUT/$log" 2>&1
  local rc=$?
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then echo "$name: TIME LIMIT ($limit s) reached (exit $rc)"
  else echo "$name exit $rc"; fi
  return 0
}

if [ "$DRY" = 1 ]; then  # tiny sizes on CPU: every stage's command line runs, in seconds
  DEVICE=cpu
  GPU_TESTS=${GPU_TESTS:-tests/test_triton_kernels.py}
  GPU_TESTS_K=${GPU_TESTS_K-auto_selection}
  QUEUE_ARGS="--n 8 --dim 16 --sizes 64 --dtype float32 --full-up-to 64 --exact-up-to 64 --reps 1 --budget 5"
  BENCH_ARGS=${BENCH_ARGS:---tiny --reps 1 --budget 5 --no-compile}
  TUNE_ARGS=${TUNE_ARGS:---device cpu --m 64 --d 32 --configs 32,32,32,1,1}
  PROFILE_ARGS=${PROFILE_ARGS:---m 64 --dim 32 --n 8 --queue-size 256 --queue-dim 16 --dtype float32}
else
  DEVICE=cuda
  # GPU_TESTS: test files; GPU_TESTS_K: a pytest -k expression (kept separate: it has spaces).
  # Default: the CUDA rows of the backend matrix (cuda and triton vs the reference; mixed
  # precision and input hygiene on CUDA), the queue statistics, the cuda backend's own GPU tests,
  # and Triton's launch tests. The slow multi-block parity grid is left to a second run.
  GPU_TESTS=${GPU_TESTS:-tests/test_backend_matrix.py tests/test_mixed_precision.py tests/test_input_hygiene.py tests/test_queue_statistics.py tests/test_cuda_build.py tests/test_cuda_on_gpu.py tests/test_triton_kernels.py}
  # dense-cuda is left out too: pure PyTorch, checked on CPU, and its rows would crowd the fused ones
  # out of the stage limit (the bench and profile stages still time it on the card).
  GPU_TESTS_K=${GPU_TESTS_K-cuda and not multi_block and not dense}
  QUEUE_ARGS="--n 256 --dim 1280 --sizes 1048576 --dtype bfloat16 --full-up-to 0 --exact-up-to 0 --reps 5 --no-memory"
  # The baselines run in the same process as the fused backends (ratios mean something only
  # within one run); the scaling sweep is left out.
  # The plain formula (what a user would otherwise run) eager and compiled; the reference eager only
  # (a second compile per config would not fit the stage limit).
  BENCH_ARGS=${BENCH_ARGS:---reps 10 --budget 8 --baselines reference,plain,plain+compile}
  TUNE_ARGS=${TUNE_ARGS:-}
  # one dense step (M = d = 4096) and one queue step (N = 256, q = 2^20, d = 1280), bf16, per backend
  PROFILE_ARGS=${PROFILE_ARGS:-}
fi

if want env; then
stage "environment (limit $LIMIT_ENV s)"
ENV_CMD="$PY -c \"import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())\""
[ "$DRY" = 1 ] || ENV_CMD="nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv; $ENV_CMD"
run env "$LIMIT_ENV" env.txt bash -c "$ENV_CMD"
cat "$OUT/env.txt"
fi

if want build; then
stage "build extension (limit $LIMIT_BUILD s)"
if [ "$DRY" = 1 ]; then
  run build "$LIMIT_BUILD" build.log $PY -c "import d2sm_ext; print('dry run: no build; backends:', d2sm_ext.available_backends())"
else
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
    run build "$LIMIT_BUILD" build.log $PY setup.py build_ext --inplace
  grep "building the CPU kernels only" "$OUT/build.log"
fi
tail -3 "$OUT/build.log"
fi

if want tests; then
stage "tests (limit $LIMIT_TESTS s)"
# pytest-xdist (the dev extra) compiles the Triton variants in parallel; without it, one process.
XDIST=""
if [ "${TEST_WORKERS:-12}" != "0" ] && [ "$DRY" = 0 ] && $PY -c "import xdist" 2>/dev/null; then
  XDIST="-n ${TEST_WORKERS:-12}"
fi
echo "pytest workers: ${XDIST:-none}"
run tests "$LIMIT_TESTS" tests.log $PY -m pytest -q -p no:cacheprovider --maxfail="${TEST_MAXFAIL:-10}" \
  --junitxml="$OUT/tests.xml" $XDIST $GPU_TESTS -k "$GPU_TESTS_K"
tail -4 "$OUT/tests.log"
fi

if want queue; then
stage "queue statistics step (limit $LIMIT_QUEUE s)"
run queue "$LIMIT_QUEUE" queue.log $PY -m benchmarks.queue_steps --device "$DEVICE" $QUEUE_ARGS --out "$OUT"
tail -3 "$OUT/queue.log"
fi

if want bench; then
stage "benchmark, no sweep (limit $LIMIT_BENCH s)"
run bench "$LIMIT_BENCH" bench.log $PY -m benchmarks.compare --device "$DEVICE" --out "$OUT" --no-sweep $BENCH_ARGS
fi

if want profile; then
stage "per-kernel profile of a dense and a queue step per backend (limit $LIMIT_PROFILE s)"
run profile "$LIMIT_PROFILE" profile.log $PY -m benchmarks.profile_steps --device "$DEVICE" --out "$OUT" $PROFILE_ARGS
grep -E "^## |^device time" "$OUT/profile_$DEVICE.md" 2>/dev/null
fi

if want extras; then
stage "extras: tile tuning (limit $LIMIT_EXTRAS s)"
run tune "$LIMIT_EXTRAS" tune.log $PY -m benchmarks.tune_triton $TUNE_ARGS
grep "^|" "$OUT/tune.log"
fi

stage "summary"
cat "$OUT/queue_steps_$DEVICE.md" 2>/dev/null
cat "$OUT/compare_$DEVICE.md" 2>/dev/null || tail -20 "$OUT/bench.log"
grep -E "passed|failed|error|Interrupted" "$OUT/tests.log" | tail -3
stage "done"
