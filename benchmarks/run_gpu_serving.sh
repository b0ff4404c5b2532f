#!/usr/bin/env bash
# One GPU run for the serving path (< 11 minutes on an H100): GPU tests of the model, transport and
# kernels, the EAGLE step cost, end-to-end serving with prefill and decode sharing the GPU, and the
# OpenAI HTTP surface against gRPC on the tiny model.
#     OUT=/some/dir bash benchmarks/run_gpu_serving.sh
OUT="${OUT:-/tmp/glmserve_gpu_serving}"
SUMMARY=SERVING.md
source "$(dirname "$0")/gpu_run.sh"
gpu_header "glmserve GPU serving run"
stage gpu_model_transport 150 $PY -m pytest tests/gpu/test_model_gpu.py tests/gpu/test_transport_gpu.py -m gpu -q -o addopts="" -rfE
stage bench_spec_step 120 $PY -m benchmarks.model_step.bench_spec_step --batches 1,8,32 --context 1024
stage bench_e2e 260 $PY -m benchmarks.serving.bench_e2e --device cuda:0 --concurrency 1,8,32 --prompt 1024 --max-tokens 64
stage bench_http 150 $PY -m benchmarks.serving.bench_http --device cuda:0 --concurrency 1,64 --tokens 64
echo "total $(( $(date +%s) - T0 ))s" | tee -a "$OUT/$SUMMARY"
