#!/usr/bin/env bash
# FP8 serving in one GPU call (< 10 minutes on one H200): the FP8 GPU tests, the FP8 kernel benchmarks
# (those in this checkout), then the full-depth GLM-4.5-Air benchmark (the loader on a real FP8
# checkpoint, FP8 at 46 layers + MTP, bf16 at the depth that fits, FP8 at that depth). On an H100 the
# full-depth benchmark picks the depths that fit and says which, then times the 46 layers with layers
# past the 14th sharing earlier layers' weights (--distinct-layers; results under $OUT/shared_layers).
#     OUT=/some/dir bash benchmarks/run_gpu_fp8.sh
#     STAGES=tests OUT=... bash benchmarks/run_gpu_fp8.sh      # the GPU tests only (first compile included)
#     STAGES=bench OUT=... bash benchmarks/run_gpu_fp8.sh      # the benchmarks only
# Results: $OUT/FP8.md (summary, with the full-depth tables and verdicts) and $OUT/results.tar (every log,
# table and JSON).
OUT="${OUT:-/tmp/glmserve_gpu_fp8}"
SUMMARY=FP8.md
STAGES="${STAGES:-tests,bench}"
source "$(dirname "$0")/gpu_run.sh"
gpu_header "glmserve FP8 run"
FP8_TESTS=(tests/gpu/*fp8*.py)
if has tests; then
  stage gpu_fp8_tests "${TESTS_LIMIT:-300}" $PY -m pytest "${FP8_TESTS[@]}" -m gpu -q -p no:cacheprovider \
    -o addopts="" -rfE
fi
if ! has bench; then
  :
elif [[ -f benchmarks/kernels/bench_fp8_linear.py ]]; then  # Air's projection shapes, full width
  stage bench_fp8_linear 80 $PY -m benchmarks.kernels.bench_fp8_linear --models air --tp 1 --budget-s 70 \
    --out "$OUT/bench_fp8_linear.json"
else
  echo "=== bench_fp8_linear: not in this checkout, skipped" | tee -a "$OUT/$SUMMARY"
fi
if has bench; then
  stage bench_quant_rows 60 $PY -m benchmarks.kernels.bench_quant_rows --out "$OUT/bench_quant_rows.json"
  stage bench_moe_fp8 80 $PY -m benchmarks.kernels.bench_moe_fp8 --tp 1,8 --budget-s 70 --out "$OUT/bench_moe_fp8.json"
  stage bench_full_depth "${FULL_DEPTH_S:-330}" $PY -m benchmarks.model_step.bench_full_depth
  # a GPU that cannot hold Air's 110 GB of FP8 weights times the full depth with layers sharing weights
  mem_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -n 1)
  if [[ "${mem_mib:-0}" -lt 120000 ]]; then
    mkdir -p "$OUT/shared_layers"
    stage bench_full_depth_shared "${SHARED_DEPTH_S:-240}" env OUT="$OUT/shared_layers" $PY -m \
      benchmarks.model_step.bench_full_depth --dtype fp8 --layers 46 --distinct-layers 14 --load-layers 0 --no-pdl-ab
  fi
fi
{
  echo; echo "## gpu tests"; grep -E "passed|failed|FAILED|ERROR" "$OUT/gpu_fp8_tests.log" 2>/dev/null | tail -n 20
  echo; cat "$OUT/bench_full_depth.md" 2>/dev/null || echo "(bench_full_depth.md missing: see bench_full_depth.log)"
  [[ -f "$OUT/shared_layers/bench_full_depth.md" ]] && { echo; cat "$OUT/shared_layers/bench_full_depth.md"; }
} >> "$OUT/$SUMMARY" 2>&1
finish
