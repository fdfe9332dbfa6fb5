#!/usr/bin/env bash
# The GPU check for the lent machine (one H100/H200, Python 3.12 + torch 2.11.0+cu130, no network): installs the
# carried bundle (scripts/device_bundle.sh -> build/device) into a --target folder and runs, each part under its own
# time limit and independent of the others (a part that fails says why, the rest goes on):
#   install        the bundle's wheels + this package (entry points), no index, no network
#   versions       torch / CUDA / GPU / triton / numpy and the carried stack; megablocks' probe
#   import_no_gpu  `import llmfoundry` (and megablocks' registration) in a process that sees no GPU
#   test_gpu       tests/test_gpu.py: the CPU proxy of the tolerances, and mb_dmoe vs torch_dmoe in bf16 on the GPU
#   train          tests/test_gpu_train.py: foundry's train() on 1 GPU: the upcycle block under FSDP1, FSDP2 and
#                  init_device meta, activation checkpointing, the router monitor; step-0 CE equal to CPT's
#   step_time      benchmarks/step_time_gpu.py: upcycled / CPT step time at the 436M width vs the active-FLOP ratio
#   generate       foundry-upcycle bench-inference --engine hf: generate throughput, dense Llama vs its Mixtral
# Writes to $OUT (default runs/device_check): results.json (every part: status, seconds, why, its numbers),
# device_check.log (all output) and logs.tar.gz (one log per part). Whole budget DEVICE_CHECK_BUDGET_S (default
# 450 s; DEVICE_CHECK_TIME_SCALE multiplies all limits): a part gets min(its own limit, what is left). Without CUDA
# the GPU parts report "skipped: no CUDA". Exit status: 1 if a part failed.
#   bash scripts/device_check.sh [BUNDLE_DIR]         (device tool: carry build/device, README "GPU check")
# DEVICE_PYTHON (default python3) is the interpreter; the CPU rehearsal (scripts/device_rehearsal.sh) sets it.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
BUNDLE=$(cd "${1:-build/device}" 2>/dev/null && pwd) || { echo "device_check: no bundle at ${1:-build/device}" \
  "(build it with: bash scripts/device_bundle.sh)" >&2; exit 2; }
OUT=${OUT:-runs/device_check}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
PY=${DEVICE_PYTHON:-python3}
WORK=$(mktemp -d /tmp/device_check.XXXXXX)
SITE=$WORK/site
SCALE=${DEVICE_CHECK_TIME_SCALE:-1}  # multiplies every limit (the CPU rehearsal on 2 loaded cores uses 4)
BUDGET=$((${DEVICE_CHECK_BUDGET_S:-450} * SCALE))
export PYTHONPATH=$REPO:$SITE PATH=$SITE/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  HF_HOME=$WORK/hf MPLCONFIGDIR=$WORK/mpl PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
  DEVICE_CHECK_DATA=$WORK/data
mkdir -p "$WORK/logs" "$WORK/data"
exec > >(tee "$OUT/device_check.log") 2>&1
T0=$SECONDS
HAVE_CUDA=0

record() {  # name status seconds why
  "$PY" - "$@" <<'PY' >> "$WORK/parts.jsonl"
import json, sys
name, status, seconds, why = sys.argv[1:5]
print(json.dumps({'part': name, 'status': status, 'seconds': int(seconds), 'why': why}))
PY
}

part() {  # name limit_s needs(cuda|any) command...
  local name=$1 limit=$(($2 * SCALE)) needs=$3 t start rc why
  shift 3
  t=$((BUDGET - (SECONDS - T0)))
  [ "$limit" -lt "$t" ] && t=$limit
  echo; echo "=== $name ($(date +%T), limit ${t}s)"
  if [ "$needs" = cuda ] && [ "$HAVE_CUDA" != 1 ]; then
    echo "skipped: no CUDA"; record "$name" skipped 0 "no CUDA"; return
  fi
  if [ "$t" -lt 10 ]; then
    echo "skipped: the ${BUDGET}s budget is spent"; record "$name" skipped 0 "the ${BUDGET}s budget is spent"; return
  fi
  start=$SECONDS
  timeout -k 10 "$t" bash -c "$*" > "$WORK/logs/$name.log" 2>&1
  rc=$?
  tail -n 25 "$WORK/logs/$name.log"
  if [ $rc -eq 0 ]; then
    record "$name" passed $((SECONDS - start)) ""
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    record "$name" failed $((SECONDS - start)) "timed out after ${t}s"
  else
    why=$(grep -E '(Error|error|FAILED|failed|Traceback|assert)' "$WORK/logs/$name.log" | tail -n 3 | cut -c1-300)
    record "$name" failed $((SECONDS - start)) "exit $rc: ${why:-see logs/$name.log}"
  fi
  echo "--- $name: $(tail -n 1 "$WORK/parts.jsonl")"
}

part install 90 any "$PY -m pip install -q --no-index --no-deps --no-compile --target '$SITE' '$BUNDLE'/*.whl &&
  $PY -m pip install -q --no-index --no-deps --no-compile --no-build-isolation --target '$WORK/self' '$REPO' &&
  cp -r '$WORK'/self/*.dist-info '$SITE'/ && cat '$BUNDLE/BUILD.txt'"
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null && HAVE_CUDA=1

part versions 60 any "$PY - <<'PY'
import importlib.metadata as md, json, os, platform, sys
import torch
info = {'python': sys.version.split()[0], 'platform': platform.platform(), 'torch': torch.__version__,
        'torch_cuda': torch.version.cuda, 'cuda_available': torch.cuda.is_available()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), capability=f'{p.major}.{p.minor}',
                gpus=torch.cuda.device_count())
for dist in ('numpy', 'triton', 'transformers', 'tokenizers', 'huggingface-hub', 'llm-foundry', 'mosaicml',
             'mosaicml-streaming', 'megablocks', 'grouped-gemm', 'stanford-stk', 'accelerate', 'foundry-upcycle'):
    try:
        info[dist] = md.version(dist)
    except md.PackageNotFoundError:
        info[dist] = None
from foundry_upcycle.moe_backend import megablocks_unavailable_reason
info['megablocks_unavailable_reason'] = megablocks_unavailable_reason()
print(json.dumps(info, indent=1))
open(os.path.join(os.environ['DEVICE_CHECK_DATA'], 'versions.json'), 'w').write(json.dumps(info))
PY"

part import_no_gpu 60 any "CUDA_VISIBLE_DEVICES= $PY -c '
import llmfoundry, torch
from llmfoundry.registry import ffns
print(\"import llmfoundry OK without a visible GPU; cuda available:\", torch.cuda.is_available())
try:
    import megablocks, grouped_gemm
    print(\"megablocks + grouped_gemm import without a GPU\")
except ImportError as e:
    print(\"megablocks not importable here:\", e)
print(\"ffns:\", sorted(ffns.get_all()))
'"

PYTEST="$PY -m pytest -p no:cacheprovider -q -s -rs --basetemp=$WORK/pytest"
part test_gpu 120 any "FOUNDRY_UPCYCLE_RESULTS=\$DEVICE_CHECK_DATA/test_gpu.json $PYTEST tests/test_gpu.py"
part train 180 cuda "FOUNDRY_UPCYCLE_RESULTS=\$DEVICE_CHECK_DATA/train.json $PYTEST -m gpu tests/test_gpu_train.py"
part step_time 90 cuda "$PY benchmarks/step_time_gpu.py --layers 4 --batch 4 --seq 2048 --warmup 3 --steps 10 \
  --json \$DEVICE_CHECK_DATA/step_time.json"
part generate 90 cuda "$PY -m foundry_upcycle.cli bench-inference --shape 436m --layers 4 --engine hf --device cuda \
  --input-tokens 512 --output-tokens 64 --num-requests 32 --batch-sizes 1,8,32 --rates '' --repeats 1 --no-progress \
  --out \$DEVICE_CHECK_DATA/generate && cp \$DEVICE_CHECK_DATA/generate/inference.json \$DEVICE_CHECK_DATA/generate.json"

echo; echo "=== results ($((SECONDS - T0)) s)"
"$PY" - "$WORK" "$OUT/results.json" $((SECONDS - T0)) <<'PY'
import json, os, sys
work, dest, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3])
parts = [json.loads(line) for line in open(os.path.join(work, 'parts.jsonl'))]
data = {}
for name in ('versions', 'test_gpu', 'train', 'step_time', 'generate'):
    path = os.path.join(work, 'data', f'{name}.json')
    if os.path.exists(path):
        try:
            data[name] = json.load(open(path))
        except ValueError as e:
            data[name] = {'unreadable': str(e)}
counts = {s: sum(p['status'] == s for p in parts) for s in ('passed', 'failed', 'skipped')}
tmp = dest + '.tmp'
with open(tmp, 'w') as f:
    json.dump({'seconds': seconds, 'summary': counts, 'parts': parts, 'data': data}, f, indent=1)
os.replace(tmp, dest)
for p in parts:
    print(f"{p['part']:14s} {p['status']:8s} {p['seconds']:4d}s  {p['why']}")
print(f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped")
PY
tar czf "$OUT/logs.tar.gz" --exclude='data/generate' -C "$WORK" logs parts.jsonl data 2>/dev/null
failed=$(grep -c '"status": "failed"' "$WORK/parts.jsonl")
rm -rf "$WORK"
[ "$failed" -eq 0 ]
