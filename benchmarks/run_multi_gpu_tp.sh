#!/usr/bin/env bash
# Tensor parallelism across 4 or 8 GPUs of one host, each call under 10 minutes (hard limits per stage):
#   allreduce  benchmarks/kernels/bench_allreduce at TP 2/4/8 (one-shot / two-shot / NCCL in graphs)   ~2 min
#   tests      the multi-GPU pytest files (tests/gpu/*multi_gpu*.py, test_tp_gpu.py, test_dummy_load_gpu.py,
#              -m "gpu or multi_gpu")                                                                    ~4 min
#   step4      bench_tp_step: TP 4, GLM-4.5-Air full depth FP8 (dummy weights): decode B=1/32/64,
#              EAGLE 3,1,4, 8K prefill, against the per-rank roofline + predicted all-reduce           ~3 min
#   step4g     the same for GLM-4.5 FP8 at TP 4, 40 of 92 layers (the full depth needs 91 GB a GPU)    ~3 min
#   tp         run_multi_gpu.py --stages tp: (prefill TP, decode TP) = (2,2), (4,2) greedy, plain and
#              EAGLE, token for token against the single-GPU reference cluster                          ~5 min
#   step8      (8 GPUs) bench_tp_step: TP 8, GLM-4.5 full depth FP8 (about 47 GB a GPU)                 ~8 min
#   glm45      (8 GPUs) run_multi_gpu.py --stages glm45: GLM-4.5 FP8 dummy weights, prefill TP 4 (GPUs
#              0-3) + decode TP 4 (GPUs 4-7), TTFT / ITL / tok/s at 1/16/64 streams, plain and EAGLE;
#              all 92 layers on H200s, 59 on 80 GB H100s (a TP 4 rank of the full model is 91 GB); glm45 =
#              plain decode, glm45e = EAGLE 3,1,4 (one deployment each: startup, graphs, 3 levels)     ~6 min each
# One call per line (each < 10 minutes):
#     STAGES=allreduce,tests,step4 OUT=/some/dir bash benchmarks/run_multi_gpu_tp.sh   # 4 or 8 GPUs
#     STAGES=tp,step4g             OUT=/some/dir bash benchmarks/run_multi_gpu_tp.sh   # 4 or 8 GPUs
#     STAGES=step8                 OUT=/some/dir bash benchmarks/run_multi_gpu_tp.sh   # 8 GPUs
#     STAGES=glm45                 OUT=/some/dir bash benchmarks/run_multi_gpu_tp.sh   # 8 GPUs
#     STAGES=glm45e                OUT=/some/dir bash benchmarks/run_multi_gpu_tp.sh   # 8 GPUs
# (default STAGES: the first line). Results: $OUT/MULTI_GPU_TP.md (summary) and $OUT/results.tar.
# The same flows on the CPU (gloo, tiny widths): bench_tp_step --tiny --tp 4, and
# run_multi_gpu --devices cpu,cpu,cpu,cpu --stages tp (--devices with 8 cpu --exercise-all --stages glm45).
OUT="${OUT:-/tmp/glmserve_multi_gpu_tp}"
SUMMARY=MULTI_GPU_TP.md
STAGES="${STAGES:-allreduce,tests,step4}"
source "$(dirname "$0")/gpu_run.sh"
gpu_header "glmserve multi-GPU TP run (stages $STAGES)"
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
echo "GPUs: $NGPU; topology:" >> "$OUT/$SUMMARY"
nvidia-smi topo -m 2>&1 | head -n 12 >> "$OUT/$SUMMARY"
need8() {  # need8 STAGE : the stage runs only with 8 GPUs
  if [ "$NGPU" -lt 8 ]; then echo "=== $1: skipped, needs 8 GPUs ($NGPU here)" | tee -a "$OUT/$SUMMARY"; return 1; fi
}
if [ "$NGPU" -lt 4 ]; then
  echo "FAIL: this run needs at least 4 GPUs ($NGPU here)" | tee -a "$OUT/$SUMMARY"
fi
if has allreduce; then
  stage bench_allreduce "${ALLREDUCE_S:-120}" $PY -m benchmarks.kernels.bench_allreduce --worlds 2,4,8
fi
if has tests; then
  stage multi_gpu_tests "${TESTS_S:-240}" $PY -m pytest tests/gpu/test_allreduce_multi_gpu.py tests/gpu/test_dummy_load_gpu.py \
    tests/gpu/test_transport_multi_gpu.py tests/gpu/test_tp_gpu.py -m "gpu or multi_gpu" -q -p no:cacheprovider \
    -o addopts="" -rfE
fi
if has step4; then
  stage bench_tp_step_air_tp4 "${STEP4_S:-200}" $PY -m benchmarks.model_step.bench_tp_step --tp 4 --model air \
    --dtype fp8
fi
if has tp; then
  stage serving_tp "${TP_S:-330}" $PY -m benchmarks.serving.run_multi_gpu --stages tp --budget-s 310 \
    --out "$OUT/serving_tp" --work-dir /tmp/glmserve_multi_gpu_tp_work
fi
if has step4g; then
  stage bench_tp_step_glm45_tp4 "${STEP4G_S:-220}" $PY -m benchmarks.model_step.bench_tp_step --tp 4 \
    --model glm45 --dtype fp8 --layers 40
fi
if has step8 && need8 step8; then
  stage bench_tp_step_glm45_tp8 "${STEP8_S:-540}" $PY -m benchmarks.model_step.bench_tp_step --tp 8 \
    --model glm45 --dtype fp8
fi
if has glm45 && need8 glm45; then
  stage serving_glm45 "${GLM45_S:-560}" $PY -m benchmarks.serving.run_multi_gpu --stages glm45 --glm45-spec off \
    --budget-s 540 --out "$OUT/serving_glm45" --work-dir /tmp/glmserve_multi_gpu_tp_work
fi
if has glm45e && need8 glm45e; then
  stage serving_glm45_eagle "${GLM45_S:-560}" $PY -m benchmarks.serving.run_multi_gpu --stages glm45 \
    --glm45-spec eagle --budget-s 540 --out "$OUT/serving_glm45_eagle" --work-dir /tmp/glmserve_multi_gpu_tp_work
fi
pkill -9 -f "[c]ommon[.]tools[.]cli" 2>/dev/null
{
  echo; echo "## multi-GPU tests"; grep -E "passed|failed|FAILED|ERROR" "$OUT/multi_gpu_tests.log" 2>/dev/null | tail -n 20
  echo; cat "$OUT/bench_allreduce.md" 2>/dev/null
  echo; cat "$OUT/bench_tp_step.md" 2>/dev/null
  for d in serving_tp serving_glm45 serving_glm45_eagle; do
    [ -f "$OUT/$d/MULTI_GPU.md" ] && { echo; echo "## $d"; cat "$OUT/$d/MULTI_GPU.md"; }
  done
} >> "$OUT/$SUMMARY" 2>&1
finish
