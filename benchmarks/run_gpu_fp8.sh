#!/usr/bin/env bash
# FP8 ops on one GPU (< 9 minutes on an H100): the FP8 GPU tests (quantisers, fused producers, FP8
# GEMMs; the norm and silu kernels the fused producers share), the RMSNorm kernels' cost against
# earlier runs (bench_kernels small ops), and the FP8 linear benchmark (fused producers, then the
# projection shapes of GLM-4.5 and Air at TP 1/2/4/8 against bf16, with the issue's targets).
#     OUT=/some/dir bash benchmarks/run_gpu_fp8.sh
# Results: $OUT/FP8.md (summary), gpu_tests.log, bench_small.log, bench_kernels.md,
# bench_fp8_linear.log, bench_fp8_linear.md, bench_fp8_linear.json.
OUT="${OUT:-/tmp/glmserve_gpu_fp8}"
SUMMARY=FP8.md
source "$(dirname "$0")/gpu_run.sh"
: > "$OUT/$SUMMARY"
gpu_header "glmserve FP8 ops run"
stage gpu_tests 150 $PY -m pytest tests/gpu/test_fp8_gpu.py tests/gpu/test_fp8_fused_gpu.py tests/gpu/test_kernels_gpu.py \
  -k "fp8 or rms_norm or silu" -m gpu -q -p no:cacheprovider -o addopts="" -rfE \
  --durations=8 -s
stage bench_small 40 $PY -m benchmarks.kernels.bench_kernels --sections small --budget-s 30
stage bench_fp8_linear 330 $PY -m benchmarks.kernels.bench_fp8_linear --budget-s 300 --out "$OUT/bench_fp8_linear.json"
{
  echo
  echo "## gpu tests"
  grep -E "passed|failed|error|FAILED|ERROR" "$OUT/gpu_tests.log" | tail -n 30
  echo
  echo "## block GEMM error vs dequantised weights x exact activations"
  grep -E "vs dequantised weights" "$OUT/gpu_tests.log" | sort -t' ' -k6 | tail -n 5
  echo
  echo "## small kernels (RMSNorm: compare with docs/performance.md)"
  grep -E "norm" "$OUT/bench_kernels.md" 2>/dev/null
  echo
  head -n 2 "$OUT/bench_fp8_linear.log" | grep -E "^(GPU|ceilings)"
  grep -E "^summary|ERROR|budget" "$OUT/bench_fp8_linear.log"
  cat "$OUT/bench_fp8_linear.md" 2>/dev/null
  echo "total $(( $(date +%s) - T0 ))s"
} >> "$OUT/$SUMMARY" 2>&1
tail -n 40 "$OUT/$SUMMARY"
