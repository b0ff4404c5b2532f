#!/usr/bin/env bash
# Kernel checks and tuning in one GPU call (< 8 minutes on an H100): the GPU kernel tests, the MoE
# sort-free path sweep and crossover, MoE block configs at prefill sizes (TMA candidates included)
# for the model's layout (routed + shared), and the extend-attention tile sweep.
#     OUT=/some/dir bash benchmarks/run_gpu_tune.sh
# Results: $OUT/TUNE.md (summary), *.log, $OUT/moe_configs/*.json (copy into common/ops/moe_configs/).
OUT="${OUT:-/tmp/glmserve_gpu_tune}"
SUMMARY=TUNE.md
source "$(dirname "$0")/gpu_run.sh"
gpu_header "glmserve GPU kernel checks and tuning"
stage gpu_tests 150 $PY -m pytest tests/gpu/test_kernels_gpu.py -m gpu -q -p no:cacheprovider -o addopts="" -rfE
stage tune_small 100 $PY benchmarks/tune_moe.py --small --budget-s 80
stage tune_large 170 $PY benchmarks/tune_moe.py --m 4096,2048,1024 --budget-s 150
stage tune_attention 70 $PY benchmarks/tune_attention.py --budget-s 50
{
  echo; echo "## gpu tests"; grep -E "passed|failed|FAILED|ERROR" "$OUT/gpu_tests.log" | tail -n 20
  echo; echo "## sort-free MoE"; grep -E "small|crossover" "$OUT/tune_small.log"
  echo; echo "## MoE configs"; grep -E "^  (air|glm45)|budget" "$OUT/tune_large.log"
  echo; echo "## attention"; grep -E "BEST" "$OUT/tune_attention.log"
  echo "total $(( $(date +%s) - T0 ))s"
} >> "$OUT/$SUMMARY" 2>&1
cat "$OUT/$SUMMARY"
