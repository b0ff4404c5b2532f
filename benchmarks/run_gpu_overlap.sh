#!/usr/bin/env bash
# One GPU run for the overlapped plain-decode schedule (< 9 minutes on an H100): its GPU tests
# (launching a step never synchronises with the device; outputs equal the synchronous loop's; the
# decode-graph tests it builds on), the engine loop alone with both schedules against the GPU floor
# (bench_overlap), then end-to-end serving of plain decode with the overlapped schedule and with
# --disable-overlap-schedule, one after the other (bench_e2e rows "on" / "off").
#     OUT=/some/dir bash benchmarks/run_gpu_overlap.sh
OUT="${OUT:-/tmp/glmserve_gpu_overlap}"
SUMMARY=OVERLAP.md
source "$(dirname "$0")/gpu_run.sh"
gpu_header "glmserve overlap schedule run"
stage gpu_overlap_tests 120 $PY -m pytest tests/gpu/test_overlap_gpu.py tests/gpu/test_decode_graphs_gpu.py -m gpu -q \
    -o addopts="" -rfE
stage bench_overlap 150 $PY -m benchmarks.model_step.bench_overlap --batches 1,8,32 --context 1024 --steps 128
stage bench_e2e_overlap 300 $PY -m benchmarks.serving.bench_e2e --device cuda:0 --concurrency 1,8,32 --prompt 1024 \
    --max-tokens 64 --overlap both --no-spec
echo "total $(( $(date +%s) - T0 ))s" | tee -a "$OUT/$SUMMARY"
