#!/usr/bin/env bash
# The FP8 fused MoE in one GPU call: its GPU tests, its tuning when asked (per-channel and 128 x 128
# block tables), then the benchmark against the bf16 kernel at Air and GLM-4.5 shapes, full width
# and TP slices. Each stage has a hard limit and writes under $OUT as it goes.
#     OUT=/some/dir bash benchmarks/run_gpu_fp8_moe.sh                       # tests + benchmark (< 9 min, H100)
#     STAGES=tune OUT=... bash benchmarks/run_gpu_fp8_moe.sh                # the FP8 tables (TUNE_TP, TUNE_M, TUNE_S)
#     STAGES=tune,bench TUNE_TP=1,8 TUNE_S=150 BENCH_TP=1,8 OUT=... bash ...  # tune a few shapes, measure with them
# Results: $OUT/FP8_MOE.md (summary), $OUT/results.tar (logs, bench_moe_fp8.md and .json),
# $OUT/moe_configs.tar (untar into common/ops/moe_configs/ and commit).
OUT="${OUT:-/tmp/glmserve_gpu_fp8_moe}"
SUMMARY=FP8_MOE.md
STAGES="${STAGES:-tests,bench}"
source "$(dirname "$0")/gpu_run.sh"
gpu_header "glmserve FP8 fused MoE: checks, tuning when asked, benchmark"
if has tests; then
  stage gpu_tests 180 $PY -m pytest tests/gpu/test_fused_moe_fp8_gpu.py -m gpu -q -p no:cacheprovider -o addopts="" \
    -rfE --durations=5
fi
if has tune; then
  for dtype in fp8 fp8-block; do
    stage "tune_$dtype" "${TUNE_S:-240}" $PY -m benchmarks.kernels.tune_moe --dtype "$dtype" --tp "${TUNE_TP:-1,8,2,4}" \
      --m "${TUNE_M:-1,4096,64,8,2048,256,32}" --budget-s $(( ${TUNE_S:-240} - 20 ))
  done
  (cd "$OUT" && tar cf moe_configs.tar moe_configs 2>/dev/null)
  [ -d "$OUT/moe_configs" ] && cp "$OUT"/moe_configs/*.json common/ops/moe_configs/  # the bench stage uses them
fi
if has bench; then
  stage bench_moe_fp8 "${BENCH_S:-330}" $PY -m benchmarks.kernels.bench_moe_fp8 --tp "${BENCH_TP:-1,8,2,4}" \
    --m "${BENCH_M:-1,8,32,64,256,2048,4096}" --budget-s $(( ${BENCH_S:-330} - 60 )) --out "$OUT/bench_moe_fp8.json"
fi
{
  echo; echo "## gpu tests"; grep -E "passed|failed|FAILED|ERROR" "$OUT/gpu_tests.log" 2>/dev/null | tail -n 20
  echo; echo "## FP8 MoE tuning"; grep -hE "^  (air|glm45)|budget|skipping" "$OUT"/tune_fp8*.log 2>/dev/null
  echo; echo "## FP8 MoE against bf16"; grep -E "^(ceilings|\||read_frac)" "$OUT/bench_moe_fp8.log" 2>/dev/null
} >> "$OUT/$SUMMARY" 2>&1
finish
