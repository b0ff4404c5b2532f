# Shared set-up of the one-call GPU scripts (sourced, not run). The caller sets OUT's default and
# SUMMARY (the summary file name under $OUT) first, and STAGES when it has stages. Provides $PY, $T0,
# `stage`, `has`, `gpu_header`, `finish` and `pack_results`.
set -u
pkill -9 -f "[c]ommon[.]tools[.]cli" 2>/dev/null  # stray glmserve servers from earlier runs hold GPU memory
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p "$OUT"
export OUT PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY="${PYTHON:-python3}"
T0=$(date +%s)
# the servers start their roles through the package's entry points: register them where the checkout
# was copied without being installed (no dependencies fetched; the build backend already there)
if ! $PY -c "import importlib.metadata as m, sys; sys.exit(0 if m.entry_points(group='glmserve.roles') else 1)"; then
  $PY -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 \
    || echo "pip install -e . failed (roles not registered): see $OUT/install.log"
fi

# the serving dependencies a bare GPU machine lacks (it cannot download): wheels carried in .wheels/
if [[ -d .wheels ]] && ! $PY -c "import grpc_health, grpc_reflection, xgrammar" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps .wheels/*.whl >> "$OUT/install.log" 2>&1 \
    || echo "installing .wheels failed: see $OUT/install.log"
fi

stage() {  # stage NAME TIMEOUT_S CMD... : run with a hard limit, log to $OUT/NAME.log, never abort the run
  local name="$1" limit="$2"
  shift 2
  local start rc
  start=$(date +%s)
  echo "=== $name (limit ${limit}s, at +$((start - T0))s)" | tee -a "$OUT/$SUMMARY"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "=== $name: rc=$rc in $(( $(date +%s) - start ))s" | tee -a "$OUT/$SUMMARY"
  tail -n 25 "$OUT/$name.log"
  return 0
}

gpu_header() {  # gpu_header TITLE : machine and software versions at the top of the summary
  {
    echo "# $1"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1
    $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
    $PY -c "import transformers; print('transformers', transformers.__version__)" 2>&1
  } >> "$OUT/$SUMMARY" 2>&1
}

has() {  # has NAME : NAME is one of the comma-separated $STAGES
  [[ ",${STAGES:-}," == *",$1,"* ]]
}

finish() {  # finish FILE... : append each existing $OUT/FILE and the run's total time to the summary,
  # pack the rest (pack_results) and print the summary
  {
    local f
    for f in "$@"; do
      [[ -f "$OUT/$f" ]] && { echo; echo "## $f"; cat "$OUT/$f"; }
    done
    echo "total $(( $(date +%s) - T0 ))s"
  } >> "$OUT/$SUMMARY" 2>&1
  pack_results
  cat "$OUT/$SUMMARY"
}

pack_results() {  # everything under $OUT but the summary and moe_configs.tar into results.tar, then
  # only those three are left: the device tool returns at most 8 files
  (cd "$OUT" && tar cf results.tar --exclude=results.tar --exclude=moe_configs.tar --exclude=moe_configs \
    --exclude="$SUMMARY" ./* \
    && find . -mindepth 1 -maxdepth 1 ! -name results.tar ! -name moe_configs.tar ! -name "$SUMMARY" -exec rm -rf {} +)
}
