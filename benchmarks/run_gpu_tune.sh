#!/usr/bin/env bash
# Kernel checks and MoE tuning in one GPU call (< 6 minutes on an H100): the GPU kernel tests, then
# the fused-MoE block configs (TMA candidates included) for the model's layout (routed + shared),
# full width and TP-8 slices, and the extend-attention tile sweep.
#     OUT=/some/dir bash benchmarks/run_gpu_tune.sh
# Results: $OUT/TUNE.md (summary), *.log, $OUT/moe_configs.tar (the tables: untar into
# common/ops/moe_configs/; their names hold '=' and ',', which the device tool does not return).
OUT="${OUT:-/tmp/glmserve_gpu_tune}"
SUMMARY=TUNE.md
source "$(dirname "$0")/gpu_run.sh"
gpu_header "glmserve GPU kernel checks and tuning"
stage gpu_tests 150 $PY -m pytest tests/gpu/test_kernels_gpu.py -m gpu -q -p no:cacheprovider -o addopts="" -rfE
stage tune_moe "${TUNE_S:-200}" $PY -m benchmarks.kernels.tune_moe --tp 1,8 --m "${TUNE_M:-1,2,4,8,16,32,64,128,256,512,1024,2048,4096}" \
  --budget-s $(( ${TUNE_S:-200} - 20 ))
(cd "$OUT" && tar cf moe_configs.tar moe_configs 2>/dev/null)
[ -n "${ATTN_S:-}" ] && stage tune_attention "$ATTN_S" $PY -m benchmarks.kernels.tune_attention --budget-s $(( ATTN_S - 15 ))
{
  echo; echo "## gpu tests"; grep -E "passed|failed|FAILED|ERROR" "$OUT/gpu_tests.log" | tail -n 20
  echo; echo "## MoE configs"; grep -E "^  (air|glm45)|budget" "$OUT/tune_moe.log"
  echo; echo "## attention"; grep -E "BEST" "$OUT/tune_attention.log" 2>/dev/null
  echo "total $(( $(date +%s) - T0 ))s"
} >> "$OUT/$SUMMARY" 2>&1
cat "$OUT/$SUMMARY"
