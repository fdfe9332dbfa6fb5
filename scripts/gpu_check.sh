#!/usr/bin/env bash
# The GPU check (issue 8): installs the gpu extra, runs the GPU tests, a 2-process FSDP upcycle step if there are
# >= 2 GPUs, and the upcycle-vs-CPT step-time benchmark at the 436M width. Budget: under 8 minutes (each part is
# time-limited; a part that cannot run says why and the rest continues). Results go to $OUT (default runs/gpu_check).
#   bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
PY=.venv/bin/python
step() { echo; echo "=== $1 ($(date +%T))"; }

step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi"
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)

step "install: bash scripts/setup.sh --gpu (CPU lock first if .venv is missing)"
[ -x "$PY" ] || timeout 240 bash scripts/setup.sh || echo "setup.sh failed"
# flash-attn is not needed here (attn_impl torch) and takes long to compile: the check builds megablocks' deps only
if ! $PY -c "import megablocks, grouped_gemm" 2>/dev/null; then
  timeout 300 bash -c 'uv=$(command -v uv || echo ~/.cache/foundry-upcycle/uv-0.13.9/bin/uv)
    $uv pip install -q --python .venv/bin/python numpy==2.0.2 packaging==24.1 &&
    $uv pip install -q --python .venv/bin/python --no-build-isolation --no-deps \
      $(grep -E "^(megablocks|grouped-gemm|stanford-stk)==" requirements-gpu.lock)' || echo "gpu extra install FAILED"
fi
$PY - <<'PY' | tee "$OUT/probe.txt"
from foundry_upcycle.moe_backend import megablocks_unavailable_reason
print('megablocks_unavailable_reason:', megablocks_unavailable_reason())
PY
step "import llmfoundry in a process that sees no GPU, extra installed"
CUDA_VISIBLE_DEVICES= timeout 120 $PY -c "import llmfoundry; print('import llmfoundry OK without a visible GPU')" \
  2>&1 | tail -3 | tee "$OUT/import_without_gpu.txt"

step "GPU tests (tests/test_gpu.py, -m gpu) + the CPU-style suite's backend tests on this box"
timeout 240 $PY -m pytest -q -s -m gpu tests/test_gpu.py 2>&1 | tail -15 | tee "$OUT/test_gpu.txt"
timeout 200 $PY -m pytest -q tests/test_config.py tests/test_core_fixes.py 2>&1 | tail -3 | tee "$OUT/test_cpu_style.txt"

if [ "${NGPU:-0}" -ge 2 ]; then
  step "2-process FSDP upcycle: bf16, FULL_SHARD, activation checkpointing, router monitor (tests/test_gpu_fsdp.py)"
  timeout 180 $PY -m pytest -q -s -m gpu tests/test_gpu_fsdp.py 2>&1 | tail -10 | tee "$OUT/fsdp.txt"
else
  echo "=== 2-process FSDP: skipped ($NGPU GPU)"
fi

step "step time: upcycle vs CPT at the 436M width (benchmarks/step_time_gpu.py)"
timeout 180 $PY benchmarks/step_time_gpu.py --layers 4 --batch 8 --seq 2048 --steps 20 --json "$OUT/step_time.json"
step "done"
