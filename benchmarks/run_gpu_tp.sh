#!/usr/bin/env bash
# Tensor parallelism on the one GPU that is lent, in one call (< 6 minutes on an H100): the TP GPU tests
# (TP 2 as two processes on one GPU against one device, every rank's Air shard through the Triton
# kernels), the per-rank slices against their roofline (bench_tp_slices), and the cost of the
# leader -> follower step plan over NCCL's host store (bench_tp_plan --device cuda).
#     OUT=/some/dir bash benchmarks/run_gpu_tp.sh
#     STAGES=tests OUT=... bash benchmarks/run_gpu_tp.sh     # the GPU tests only
# Results: $OUT/TP.md (summary) and $OUT/results.tar (every log, table and JSON).
OUT="${OUT:-/tmp/glmserve_gpu_tp}"
SUMMARY=TP.md
STAGES="${STAGES:-tests,bench}"
source "$(dirname "$0")/gpu_run.sh"
gpu_header "glmserve TP run"
if has tests; then
  stage gpu_tp_tests "${TESTS_LIMIT:-200}" $PY -m pytest tests/gpu/test_tp_gpu.py -m gpu -q -p no:cacheprovider \
    -o addopts="" -rfE
fi
if has bench; then
  stage bench_tp_slices "${SLICES_S:-150}" $PY -m benchmarks.model_step.bench_tp_slices --batches 1,8,32
  stage bench_tp_plan 60 $PY -m benchmarks.model_step.bench_tp_plan --device cuda
fi
{
  echo; echo "## gpu tests"; grep -E "passed|failed|FAILED|ERROR" "$OUT/gpu_tp_tests.log" 2>/dev/null | tail -n 20
  echo; cat "$OUT/bench_tp_slices.md" 2>/dev/null || echo "(bench_tp_slices.md missing: see bench_tp_slices.log)"
  echo; tail -n 20 "$OUT/bench_tp_plan.log" 2>/dev/null
} >> "$OUT/$SUMMARY" 2>&1
finish
