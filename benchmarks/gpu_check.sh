#!/usr/bin/env bash
# One-shot GPU check (docs/DESIGN.md §8 machine: torch 2.11, triton 3.6, Python 3.12, no network).
#   benchmarks/gpu_check.sh OUTDIR
# Builds the C++/CUDA extension (setup.py; CUDA kernels when the toolkit matches torch's CUDA),
# runs the GPU tests (the "cuda" and "triton" backends vs the reference on CUDA tensors,
# fp32/tf32/fp16/bf16/fp64, gradients), tries a few Triton tile configurations, runs the
# comparison benchmark (every usable backend), and prints a short table last. Everything it writes goes under OUTDIR;
# each stage has its own time limit so that the whole script ends in about 8 minutes at most
# (BENCHMARKS.md has the times seen on the cards it ran on).
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
SECONDS=0
stage() { echo "== [$SECONDS s] $*"; }

stage "environment"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"

stage "build extension (sm_90)"
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
  timeout 240 $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1 \
  && echo "build ok" || { echo "BUILD FAILED (see build.log)"; tail -30 "$OUT/build.log"; }
grep "building the CPU kernels only" "$OUT/build.log"
$PY -c "import d2sm_ext; print('backends:', list(d2sm_ext.available_backends()), d2sm_ext.unavailable_backends())"

stage "GPU tests"
# GPU_TESTS: test files; GPU_TESTS_K: a pytest -k expression (kept separate: it has spaces).
# Default: the CUDA rows of the backend matrix (cuda and triton vs the reference; mixed precision
# and input hygiene on CUDA), the cuda backend's own GPU tests, and Triton's launch tests.
# The slow multi-block parity grid is left to a second run (GPU_TESTS_K="cuda").
GPU_TESTS=${GPU_TESTS:-tests/test_backend_matrix.py tests/test_mixed_precision.py tests/test_input_hygiene.py tests/test_queue_statistics.py tests/test_cuda_build.py tests/test_cuda_on_gpu.py tests/test_triton_kernels.py}
GPU_TESTS_K=${GPU_TESTS_K-cuda and not multi_block}
XDIST=""; [ "${TEST_WORKERS:-12}" != "0" ] && XDIST="-n ${TEST_WORKERS:-12}"  # pytest-xdist: compile in parallel
timeout ${TEST_TIMEOUT:-150} $PY -m pytest -q -x -p no:cacheprovider $XDIST $GPU_TESTS -k "$GPU_TESTS_K" \
  >"$OUT/tests.log" 2>&1; echo "tests exit $?"; tail -4 "$OUT/tests.log"

stage "tile tuning (triton)"
timeout ${TUNE_TIMEOUT:-45} $PY -m benchmarks.tune_triton ${TUNE_ARGS:-} >"$OUT/tune.log" 2>&1; echo "tune exit $?"
cat "$OUT/tune.log" | grep "^|"

stage "benchmark"
# The eager reference and torch.compile(reference) run in the same process as the fused backends
# (ratios mean something only within one run); BENCH_ARGS="--no-compile ..." drops the compile baseline.
timeout ${BENCH_TIMEOUT:-240} $PY -m benchmarks.compare --device cuda --out "$OUT" ${BENCH_ARGS:---reps 10 --budget 8} \
  >"$OUT/bench.log" 2>&1; echo "bench exit $?"

stage "queue statistics (q = 2^20, d = 1280, N = 256, bf16)"
timeout ${QUEUE_TIMEOUT:-90} $PY -m benchmarks.queue_steps --device cuda --n 256 --dim 1280 --sizes 1048576 \
  --dtype bfloat16 --full-up-to 0 --exact-up-to 0 --reps 5 --no-memory --out "$OUT" >"$OUT/queue.log" 2>&1
echo "queue exit $?"; tail -3 "$OUT/queue.log"

stage "summary"
cat "$OUT/compare_cuda.md" 2>/dev/null || tail -40 "$OUT/bench.log"
grep -E "passed|failed|error" "$OUT/tests.log" | tail -3
stage "done"
