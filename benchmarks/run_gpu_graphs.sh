#!/usr/bin/env bash
pkill -9 -f "[c]ommon[.]tools[.]cli"  # stray servers from earlier runs hold GPU memory
# Decode CUDA graphs on one GPU (< 7 minutes on an H100): graph-vs-eager GPU tests (plain decode and
# EAGLE), the plain and EAGLE step cost with and without the worker's graphs (decode graphs; EAGLE
# verify + draft-step graphs), and end-to-end serving (the decode worker captures its graphs at
# start-up by default: the decode step's, or with EAGLE on the verify and draft steps').
#     OUT=/some/dir bash benchmarks/run_gpu_graphs.sh
# Results (6 files): $OUT/GRAPHS.md (summary), gpu_tests.log, bench_spec_step.log, bench_spec_step.md,
# bench_e2e.log, bench_e2e.md (+ e2e_workers.log: worker log tails).
OUT="${OUT:-/tmp/glmserve_gpu_graphs}"
SUMMARY=GRAPHS.md
source "$(dirname "$0")/gpu_run.sh"
gpu_header "glmserve decode CUDA graphs run"
stage gpu_tests 100 $PY -m pytest tests/gpu/test_decode_graphs_gpu.py tests/gpu/test_eagle_graphs_gpu.py tests/gpu/test_kernels_gpu.py -k "graph" -m gpu -q \
  -p no:cacheprovider -o addopts="" -rfE
stage bench_spec_step 150 $PY -m benchmarks.model_step.bench_spec_step --batches 1,8,32 --context 1024
pkill -9 -f "[c]ommon[.]tools[.]cli"
E2E_LOGS="$(mktemp -d /tmp/glmserve_graphs_e2e.XXXXXX)"
stage bench_e2e 170 $PY -m benchmarks.serving.bench_e2e --device cuda:0 --concurrency 1,8,32 --prompt 1024 --max-tokens 64 \
  --log-dir "$E2E_LOGS"
pkill -9 -f "[c]ommon[.]tools[.]cli"
{
  echo
  echo "## gpu tests"
  grep -E "passed|failed|error|FAILED|ERROR" "$OUT/gpu_tests.log" | tail -n 15
  echo
  echo "## step cost (bench_spec_step.md)"
  cat "$OUT/bench_spec_step.md" 2>/dev/null || echo "(missing)"
  echo
  echo "## end to end (bench_e2e.md)"
  cat "$OUT/bench_e2e.md" 2>/dev/null || echo "(missing)"
  echo
  echo "## CUDA graph capture (worker logs: decode for plain, EAGLE verify/draft/extend for spec)"
  grep -rh "captured .* CUDA graphs\|CUDA graphs off" "$E2E_LOGS" 2>/dev/null | head -n 4
  echo "total $(( $(date +%s) - T0 ))s"
} >> "$OUT/$SUMMARY" 2>&1
tail -n 60 "$OUT/$SUMMARY"
