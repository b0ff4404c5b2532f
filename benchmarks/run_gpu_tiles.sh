#!/usr/bin/env bash
# The few-token FP8 projection tiles of this GPU in one call (< 10 minutes): the sweep (plain, swapped
# and TMA tiles; bench_fp8_linear --sections sweep) over MODELS x TPS merged into
# common/ops/fp8_gemm_tuned.json, the GPU tests of the tuned and swapped tiles, then (FULL_S > 0) the
# full-depth Air-FP8 step on the new table against the table the call started with (variant
# tiles-file), plus any variants in AB.
#     OUT=/some/dir [MODELS=air] [TPS=1] [SWEEP_S=220] [FULL_S=250] [AB=skip=experts] bash benchmarks/run_gpu_tiles.sh
# Results: $OUT/TILES.md (summary) and, in results.tar, fp8_gemm_tuned.json (the merged table: copy it
# over common/ops/fp8_gemm_tuned.json), tiles_before.json, bench_fp8_linear.md / .json,
# bench_full_depth.md and the logs.
OUT="${OUT:-/tmp/glmserve_gpu_tiles}"
SUMMARY=TILES.md
source "$(dirname "$0")/gpu_run.sh"
gpu_header "glmserve few-token FP8 tiles"
SWEEP_S="${SWEEP_S:-220}"
FULL_S="${FULL_S:-250}"
cp common/ops/fp8_gemm_tuned.json "$OUT/tiles_before.json"
stage sweep "$SWEEP_S" $PY -m benchmarks.kernels.bench_fp8_linear --sections sweep --models "${MODELS:-air}" \
  --tp "${TPS:-1}" --m 1,64 --budget-s $(( SWEEP_S - 50 )) --out "$OUT/bench_fp8_linear.json" \
  --update-table common/ops/fp8_gemm_tuned.json
cp common/ops/fp8_gemm_tuned.json "$OUT/fp8_gemm_tuned.json"
stage gpu_tests 90 $PY -m pytest tests/gpu/test_fp8_fused_gpu.py -m gpu -q -p no:cacheprovider -o addopts="" -rfE \
  -k "swapped or tuned_tiles"
if (( FULL_S > 0 )); then
  stage full "$FULL_S" $PY -m benchmarks.model_step.bench_full_depth --dtype fp8 --layers 46 --distinct-layers 14 \
    --load-layers 0 --no-pdl-ab --batches 1,64 --prefill 256 --ab "tiles-file=$OUT/tiles_before.json${AB:+,$AB}"
fi
{
  echo; echo "## gpu tests"; grep -E "passed|failed|FAILED|ERROR" "$OUT/gpu_tests.log" | tail -n 20
} >> "$OUT/$SUMMARY" 2>&1
finish bench_fp8_linear.md bench_full_depth.md
