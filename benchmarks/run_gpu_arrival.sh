#!/usr/bin/env bash
# The last-arrival epilogues (common/ops/arrival.py) in one GPU call (< 10 minutes on an H100 or H200):
# their GPU tests (bit-equal to the separate launches, repeated and across CUDA-graph replays), the
# prefix-cache rows at serving depth (bench_prefix_cache --layers: 10 Air-width layers on an H100, 20
# on a GPU of 120 GB or more), then GLM-4.5-Air-FP8 at its full 46 layers + MTP timed with and without
# the epilogues (decode and EAGLE at B = 1 / 32 / 64, with a per-kernel profile of the B = 1 step; on a
# GPU smaller than the model's 110 GB the layers past the 14th share earlier layers' weights).
#     OUT=/some/dir bash benchmarks/run_gpu_arrival.sh
#     STAGES=tests,depth OUT=... TESTS_K="router_topk" DEPTH_ARGS="--batches 1 --prefill 1024" bash benchmarks/run_gpu_arrival.sh
# Results: $OUT/ARRIVAL.md (summary with the tables) and $OUT/results.tar (every log, table and JSON).
OUT="${OUT:-/tmp/glmserve_gpu_arrival}"
SUMMARY=ARRIVAL.md
STAGES="${STAGES:-tests,cache,depth}"
source "$(dirname "$0")/gpu_run.sh"
gpu_header "glmserve last-arrival run"
mem_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -n 1)
big=$(( ${mem_mib:-0} >= 120000 ))
if has tests; then  # TESTS_K narrows them (pytest -k)
  stage gpu_tests "${TESTS_LIMIT:-240}" $PY -m pytest tests/gpu/test_kernels_gpu.py tests/gpu/test_router_gpu.py \
    tests/gpu/test_moe_fp8_last_arrival_gpu.py tests/gpu/test_fused_moe_fp8_gpu.py tests/gpu/test_fp8_model_gpu.py \
    -m gpu -q -p no:cacheprovider -o addopts="" -rfE ${TESTS_K:+-k "$TESTS_K"}
fi
if has cache; then
  layers=10
  [[ $big == 1 ]] && layers=20
  stage bench_prefix_cache "${CACHE_S:-300}" $PY -m benchmarks.serving.bench_prefix_cache --layers $layers ${CACHE_ARGS:-}
fi
if has depth; then  # DEPTH_ARGS replaces the batches, prefill lengths and profile
  depth=(--layers 46)
  [[ $big == 1 ]] || depth+=(--distinct-layers 14)
  mkdir -p "$OUT/depth"
  stage bench_full_depth "${DEPTH_S:-330}" env OUT="$OUT/depth" $PY -m benchmarks.model_step.bench_full_depth \
    --dtype fp8 "${depth[@]}" ${DEPTH_ARGS:---batches 1,32,64 --prefill 1024 --profile 1} --load-layers 0 \
    --no-pdl-ab --arrival-ab
fi
finish depth/bench_full_depth.md bench_prefix_cache.md
