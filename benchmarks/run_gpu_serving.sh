#!/usr/bin/env bash
# One GPU run for the serving path (< 9 minutes on an H100): GPU tests of the model, transport and
# kernels, the EAGLE step cost, and end-to-end serving with prefill and decode sharing the GPU.
#     OUT=/some/dir bash benchmarks/run_gpu_serving.sh
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/glmserve_gpu_serving}"
mkdir -p "$OUT"
export OUT PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY="${PYTHON:-python3}"
T0=$(date +%s)
stage() {  # stage NAME TIMEOUT_S CMD...
  local name="$1" limit="$2"; shift 2
  local start; start=$(date +%s)
  echo "=== $name (limit ${limit}s, at +$((start - T0))s)" | tee -a "$OUT/SERVING.md"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "=== $name: rc=$? in $(( $(date +%s) - start ))s" | tee -a "$OUT/SERVING.md"
  tail -n 25 "$OUT/$name.log"
}
{
  echo "# glmserve GPU serving run"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
} >> "$OUT/SERVING.md" 2>&1
stage gpu_model_transport 150 $PY -m pytest tests/gpu/test_model_gpu.py tests/gpu/test_transport_gpu.py -m gpu -q -o addopts="" -rfE
stage bench_spec_step 120 $PY benchmarks/bench_spec_step.py --batches 1,8,32 --context 1024
stage bench_e2e 260 $PY benchmarks/bench_e2e.py --device cuda:0 --concurrency 1,8,32 --prompt 1024 --max-tokens 64
echo "total $(( $(date +%s) - T0 ))s" | tee -a "$OUT/SERVING.md"
