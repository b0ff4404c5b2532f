pkill -9 -f "[c]ommon[.]tools[.]cli"
# Two-GPU disaggregated serving run (< 9 minutes): prefill worker on GPU 0, decode worker on GPU 1,
# NCCL KV transport; outputs compared with the same requests on one GPU (CUDA IPC); cancellation,
# a killed decode worker, KV bandwidth, transfer/compute overlap, TTFT/ITL at 1/8/32 requests.
#     OUT=/some/dir bash benchmarks/run_multi_gpu.sh
#     OUT=/tmp/mg bash benchmarks/run_multi_gpu.sh --devices cpu,cpu     # same flow on CPU (tiny model)
# The first line ends any glmserve worker left over from an earlier run on this machine.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/glmserve_multi_gpu_out}"
mkdir -p "$OUT"
export OUT PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY="${PYTHON:-python3}"
LIMIT="${RUN_LIMIT_S:-525}"
case " $* " in *" cpu,cpu "*|*"=cpu,cpu "*) LIMIT="${RUN_LIMIT_S:-3600}";; esac
start=$(date +%s)
timeout --kill-after=15 "$LIMIT" $PY -m benchmarks.serving.run_multi_gpu --out "$OUT" "$@" 2>&1 | tee "$OUT/run_multi_gpu.log"
rc=${PIPESTATUS[0]}
pkill -9 -f "[c]ommon[.]tools[.]cli" || true
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
  echo "FAIL: run_multi_gpu.py hit the ${LIMIT}s limit; partial results are in $OUT/MULTI_GPU.md" | tee -a "$OUT/MULTI_GPU.md"
fi
echo "run_multi_gpu: rc=$rc in $(( $(date +%s) - start ))s; summary $OUT/MULTI_GPU.md"
exit "$rc"
