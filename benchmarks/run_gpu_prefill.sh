#!/usr/bin/env bash
# The prefill path in one or two GPU calls: kernel checks, the fused-MoE tuning at prefill token
# counts, then the kernels, the expert alignment and the 2048-token prefill against their rooflines.
#     OUT=/some/dir bash benchmarks/run_gpu_prefill.sh                 # all stages (~12 min on an H100)
#     STAGES=tests,tune OUT=... bash benchmarks/run_gpu_prefill.sh    # then STAGES=bench with the new tables
# Results: $OUT/PREFILL.md (summary), $OUT/results.tar (every log and table), $OUT/moe_configs.tar
# (untar into common/ops/moe_configs/).
OUT="${OUT:-/tmp/glmserve_gpu_prefill}"
SUMMARY=PREFILL.md
STAGES="${STAGES:-tests,tune,bench}"
source "$(dirname "$0")/gpu_run.sh"
gpu_header "glmserve prefill path: checks, MoE tuning, benchmarks"
if has tests; then
  stage gpu_tests 240 $PY -m pytest tests/gpu/test_kernels_gpu.py tests/gpu/test_router_gpu.py \
    -m gpu -q -p no:cacheprovider -o addopts="" -rfE -k "moe or topk or router"
fi
if has tune; then
  stage tune_moe "${TUNE_S:-300}" $PY -m benchmarks.kernels.tune_moe --m "${TUNE_M:-1024,2048,4096}" \
    --budget-s $(( ${TUNE_S:-300} - 30 ))
  (cd "$OUT" && tar cf moe_configs.tar moe_configs 2>/dev/null)
fi
if has bench; then
  stage bench_moe 200 $PY -m benchmarks.kernels.bench_kernels --sections moe --budget-s 170
  stage bench_align 90 $PY -m benchmarks.kernels.bench_align
  stage bench_router 60 $PY -m benchmarks.kernels.bench_router
  stage profile_prefill 120 $PY -m benchmarks.model_step.profile_step --decode "" --prefill 2048
  stage bench_step 240 $PY -m benchmarks.model_step.bench_decode_step --batches "${BENCH_BATCHES:-1}" --prefill 2048
fi
{
  echo; echo "## gpu tests"; grep -E "passed|failed|FAILED|ERROR" "$OUT/gpu_tests.log" 2>/dev/null | tail -n 20
  echo; echo "## MoE tuning"; grep -hE "^  (air|glm45)|budget" "$OUT"/tune_moe.log 2>/dev/null
} >> "$OUT/$SUMMARY" 2>&1
finish
