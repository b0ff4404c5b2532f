#!/usr/bin/env bash
# One GPU run, < 9 minutes on an H100: kernel and model tests, an optional MoE re-tune, the kernel benchmarks and the
# decode-step benchmark. Every stage has a hard timeout and writes under $OUT as it goes, so a slow
# or failing stage still leaves the others' results. Run from the repository root:
#     OUT=/some/dir bash benchmarks/run_gpu_suite.sh
# Results: $OUT/SUMMARY.md (everything), $OUT/*.log, $OUT/bench_kernels.md, $OUT/bench_decode_step.md,
# with TUNE_ARGS set $OUT/moe_configs.tar (untar into common/ops/moe_configs/ and commit).
OUT="${OUT:-/tmp/glmserve_gpu_suite}"
SUMMARY=SUMMARY.md
source "$(dirname "$0")/gpu_run.sh"
: > "$OUT/$SUMMARY"
gpu_header "glmserve GPU suite"

stage gpu_tests 240 $PY -m pytest tests/gpu/test_kernels_gpu.py tests/gpu/test_model_gpu.py -m gpu -q -p no:cacheprovider \
  -o addopts="" -rfE --durations=8
# TUNE_ARGS (e.g. "--shared 0 --m 1024,2048,4096 --budget-s 60"): re-tune before measuring; tables in $OUT/moe_configs.tar
if [ -n "${TUNE_ARGS:-}" ]; then
  stage tune_moe 120 $PY -m benchmarks.kernels.tune_moe $TUNE_ARGS
  (cd "$OUT" && tar cf moe_configs.tar moe_configs 2>/dev/null)
fi
stage bench_moe 120 $PY -m benchmarks.kernels.bench_kernels --sections moe --budget-s 100
stage bench_attention 50 $PY -m benchmarks.kernels.bench_kernels --sections attention --budget-s 35
stage bench_small 35 $PY -m benchmarks.kernels.bench_kernels --sections small --budget-s 25
stage bench_decode_step 100 $PY -m benchmarks.model_step.bench_decode_step

{
  echo
  echo "## gpu tests"
  grep -E "passed|failed|error|skipped|FAILED|ERROR" "$OUT/gpu_tests.log" | tail -n 30
  echo
  echo "## tuned MoE configs"
  grep -E "^  (air|glm45)|budget" "$OUT/tune_moe.log" 2>/dev/null
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
