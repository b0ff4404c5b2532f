#!/usr/bin/env bash
# One GPU run, < 8 minutes on an H100: kernel tests, a quick MoE tune, the kernel benchmarks and the
# decode-step benchmark. Every stage has a hard timeout and writes under $OUT as it goes, so a slow
# or failing stage still leaves the others' results. Run from the repository root:
#     OUT=/some/dir bash benchmarks/run_gpu_suite.sh
# Results: $OUT/SUMMARY.md (everything), $OUT/*.log, $OUT/bench_kernels.md, $OUT/bench_decode_step.md,
# $OUT/moe_configs/*.json (copy into common/ops/moe_configs/ and commit).
OUT="${OUT:-/tmp/glmserve_gpu_suite}"
SUMMARY=SUMMARY.md
source "$(dirname "$0")/gpu_run.sh"
: > "$OUT/$SUMMARY"
gpu_header "glmserve GPU suite"

stage gpu_tests 120 $PY -m pytest tests/gpu/test_kernels_gpu.py -m gpu -q -p no:cacheprovider -o addopts="" -rfE --durations=8
stage tune_moe 80 $PY benchmarks/tune_moe.py --budget-s 60
stage bench_moe 100 $PY benchmarks/bench_kernels.py --sections moe --budget-s 75
stage bench_attention 50 $PY benchmarks/bench_kernels.py --sections attention --budget-s 35
stage bench_small 35 $PY benchmarks/bench_kernels.py --sections small --budget-s 25
stage bench_decode_step 100 $PY benchmarks/bench_decode_step.py

{
  echo
  echo "## gpu tests"
  grep -E "passed|failed|error|skipped|FAILED|ERROR" "$OUT/gpu_tests.log" | tail -n 30
  echo
  echo "## tuned MoE configs"
  grep -E "^  (air|glm45)|budget" "$OUT/tune_moe.log"
  echo
  echo "## kernels"
  head -n 3 "$OUT/bench_moe.log" | grep -E "^(GPU|ceilings)"
  cat "$OUT/bench_kernels.md" 2>/dev/null
  echo
  echo "## decode step (4-layer Air-shaped model)"
  cat "$OUT/bench_decode_step.md" 2>/dev/null
  echo
  echo "total $(( $(date +%s) - T0 ))s"
} >> "$OUT/$SUMMARY"
tail -n 80 "$OUT/$SUMMARY"
