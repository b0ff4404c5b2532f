#!/usr/bin/env bash
# The decode path in one GPU call: kernel, model and graph checks, then the MoE kernels at decode
# sizes, a profiled B=1 step and the decode steps against their rooflines and transformers; the
# fused-MoE tuning at decode token counts when asked for.
#     OUT=/some/dir bash benchmarks/run_gpu_decode.sh                  # tests + benchmarks (~6 min, H100)
#     STAGES=tune,bench OUT=... bash benchmarks/run_gpu_decode.sh
#     STAGES=tests,pdl,bench ...   # adds the MoE PDL comparison and a whole-step run without PDL
# Results: $OUT/DECODE.md (summary), $OUT/results.tar (every log and table), $OUT/moe_configs.tar
# (untar into common/ops/moe_configs/).
OUT="${OUT:-/tmp/glmserve_gpu_decode}"
SUMMARY=DECODE.md
STAGES="${STAGES:-tests,bench}"
source "$(dirname "$0")/gpu_run.sh"
gpu_header "glmserve decode path: checks, benchmarks (MoE tuning when asked)"
if has tests; then
  stage gpu_tests 240 $PY -m pytest tests/gpu/test_kernels_gpu.py tests/gpu/test_model_gpu.py \
    tests/gpu/test_decode_graphs_gpu.py tests/gpu/test_eagle_graphs_gpu.py tests/gpu/test_overlap_gpu.py -m gpu -q -p no:cacheprovider -o addopts="" -rfE -k "${TESTS_K:-moe or model or graph or overlap or bf16}"
fi
if has tune; then
  stage tune_moe "${TUNE_S:-150}" $PY -m benchmarks.kernels.tune_moe --m "${TUNE_M:-1,8}" --tp "${TUNE_TP:-1,8}" \
    --budget-s $(( ${TUNE_S:-150} - 20 ))
  (cd "$OUT" && tar cf moe_configs.tar moe_configs 2>/dev/null)
  [ -d "$OUT/moe_configs" ] && cp "$OUT"/moe_configs/*.json common/ops/moe_configs/  # the bench stage uses them
fi
if has pdl; then  # fused MoE with / without programmatic dependent launch, kernels and whole steps
  stage bench_moe_pdl 200 $PY -m benchmarks.kernels.bench_moe_pdl --m "${PDL_M:-1,8,64,4096}"
  stage bench_step_nopdl 200 env GLMSERVE_PDL=0 $PY -m benchmarks.model_step.bench_decode_step --batches "${BENCH_BATCHES:-1,8}" --prefill 0
fi
if has bench; then
  stage bench_moe 120 $PY -m benchmarks.kernels.bench_kernels --sections moe --moe-m "${BENCH_M:-1,8}" --budget-s 100
  stage profile_decode 90 $PY -m benchmarks.model_step.profile_step --decode 1 --prefill 0
  stage bench_step 200 $PY -m benchmarks.model_step.bench_decode_step --batches "${BENCH_BATCHES:-1,8}" --prefill 0
fi
{
  echo; echo "## gpu tests"; grep -E "passed|failed|FAILED|ERROR" "$OUT/gpu_tests.log" 2>/dev/null | tail -n 20
  echo; echo "## MoE tuning"; grep -hE "^  (air|glm45)|budget" "$OUT"/tune_moe.log 2>/dev/null
  echo; echo "## MoE kernels"; grep -E "fused_moe" "$OUT/bench_moe.log" 2>/dev/null
  echo; echo "## MoE PDL"; grep -E "^\|" "$OUT/bench_moe_pdl.log" 2>/dev/null
} >> "$OUT/$SUMMARY" 2>&1
finish
