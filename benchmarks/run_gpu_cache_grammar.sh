#!/usr/bin/env bash
# Prefix caching and structured output on the one GPU that is lent, in one call (< 10 minutes on an
# H100 with the default stages): their GPU tests, the grammar engines' mask cost against the decode
# step (bench_grammar), cold / warm / last-page TTFT with the cache on and off (bench_prefix_cache),
# cache-aware against least-loaded routing on 4 prefill workers (bench_prefix_cache --routing 4), and
# with STAGES naming `e2e` the serving throughput with and without a JSON-schema constraint (bench_e2e),
# `agent` the agent replay through the OpenAI API with the caches on and off (bench_agent_replay),
# `local` the decode worker's local prefill against the prefill leg (bench_local_prefill).
#     OUT=/some/dir bash benchmarks/run_gpu_cache_grammar.sh
#     STAGES=e2e OUT=... bash benchmarks/run_gpu_cache_grammar.sh
#     STAGES=cache CACHE_ARGS="--layers 10 --concurrency 1 --rounds 2" OUT=... bash benchmarks/run_gpu_cache_grammar.sh
#       (the cache rows at a serving depth: 10 Air-width layers with dummy weights; 20 fit an H200)
# Results: $OUT/CACHE_GRAMMAR.md (summary) and $OUT/results.tar (every log and table).
OUT="${OUT:-/tmp/glmserve_gpu_cache_grammar}"
SUMMARY=CACHE_GRAMMAR.md
STAGES="${STAGES:-tests,grammar,cache,routing}"
source "$(dirname "$0")/gpu_run.sh"
gpu_header "glmserve prefix-cache and structured-output run"
if has tests; then
  stage gpu_tests "${TESTS_LIMIT:-150}" $PY -m pytest tests/gpu/test_grammar_gpu.py tests/gpu/test_symm_allreduce_gpu.py \
    tests/gpu/test_dummy_load_gpu.py -m gpu -q -p no:cacheprovider -o addopts="" -rfE
fi
has grammar && stage bench_grammar "${GRAMMAR_S:-70}" $PY -m benchmarks.kernels.bench_grammar
has cache && stage bench_prefix_cache "${CACHE_S:-190}" $PY -m benchmarks.serving.bench_prefix_cache ${CACHE_ARGS:-}
has routing && stage bench_routing "${ROUTING_S:-150}" $PY -m benchmarks.serving.bench_prefix_cache --routing 4 --routing-keys
has agent && stage bench_agent_replay "${AGENT_S:-240}" $PY -m benchmarks.serving.bench_agent_replay --sessions 8
has local && stage bench_local_prefill "${LOCAL_S:-200}" $PY -m benchmarks.serving.bench_local_prefill
has e2e && stage bench_e2e "${E2E_S:-220}" $PY -m benchmarks.serving.bench_e2e --concurrency 1,32,64 --prompt 512 \
  --max-tokens 128 --constraints none,json
{ echo; echo "## gpu tests"; grep -E "passed|failed|FAILED|ERROR" "$OUT/gpu_tests.log" 2>/dev/null | tail -n 20; } \
  >> "$OUT/$SUMMARY" 2>&1
finish bench_grammar.md bench_prefix_cache.md bench_prefix_cache_routing.md bench_agent_replay.md bench_local_prefill.md \
  bench_e2e.md
