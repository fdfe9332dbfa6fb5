#!/usr/bin/env bash
# The GPU check's CPU rehearsal (README, "GPU check"): what the lent machine will run, on this machine.
#   bash scripts/device_rehearsal.sh [TEST_FILE...]     -> runs/device_rehearsal/{check,tests.txt,junit.xml}
# 1. builds (or reuses) the bundle: scripts/device_bundle.sh, whose Python 3.12 venv holds torch 2.11.0 (PyPI's
#    build runs on CPU) and the GPU machine's own packages at their versions there (transformers 5.17, numpy 2.5.2...);
# 2. runs scripts/device_check.sh with that interpreter (parts that need CUDA report "skipped: no CUDA");
# 3. installs the bundle into a --target folder as the check does and runs the CPU test files (default: all of
#    tests/ but test_setup_script.py, which checks the Python 3.11 set-up) on torch 2.11 with the carried stack,
#    writing the pass / fail / skip list per test file to runs/device_rehearsal/tests.txt (tests/test_gpu_train.py
#    runs its CPU-capable arms there: FOUNDRY_UPCYCLE_REHEARSE_GPU_TRAIN=1).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=runs/device_rehearsal
mkdir -p "$OUT"
bash scripts/device_bundle.sh || exit 1
PY=${XDG_CACHE_HOME:-$HOME/.cache}/foundry-upcycle/device/py312-torch2.11/bin/python
echo "[rehearsal] scripts/device_check.sh with $PY (time limits x4: 2 shared cores)" >&2
OUT=$OUT/check DEVICE_PYTHON=$PY DEVICE_CHECK_TIME_SCALE=${DEVICE_CHECK_TIME_SCALE:-4} bash scripts/device_check.sh
check=$?
SITE=$(mktemp -d /tmp/device_rehearsal.XXXXXX)
"$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE/site" build/device/*.whl &&
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-build-isolation --target "$SITE/self" . 2>/dev/null &&
  cp -r "$SITE"/self/*.dist-info "$SITE/site/" || exit 1
if [ $# -eq 0 ]; then set -- $(ls tests/test_*.py | grep -v test_setup_script.py); fi
echo "[rehearsal] pytest on torch 2.11 + the bundle: $*" >&2
PYTHONPATH=$PWD:$SITE/site PYTHONDONTWRITEBYTECODE=1 FOUNDRY_UPCYCLE_REHEARSE_GPU_TRAIN=1 "$PY" -m pytest -q -p no:cacheprovider -rfEs \
  --junitxml="$OUT/junit.xml" "$@" 2>&1 | tee "$OUT/pytest.log" | tail -n 40
"$PY" - "$OUT/junit.xml" "$OUT/tests.txt" <<'PY'
import collections, sys, xml.etree.ElementTree as ET
cases = ET.parse(sys.argv[1]).getroot().iter('testcase')
per = collections.defaultdict(lambda: collections.Counter())
why = collections.defaultdict(list)
for c in cases:
    parts = c.get('classname', '').split('.')   # tests.test_x[.Class]: per test file
    f = next((p for p in parts if p.startswith('test_')), parts[0] or '?')
    kind = next((k.tag for k in c if k.tag in ('failure', 'error', 'skipped')), 'passed')
    per[f][kind] += 1
    if kind != 'passed':
        msg = (c.find(kind).get('message') or '').splitlines()
        why[f].append(f"  {kind}: {c.get('name')}: {(msg[0] if msg else '')[:200]}")
with open(sys.argv[2], 'w') as out:
    for f in sorted(per):
        n = per[f]
        out.write(f"{f}: {n['passed']} passed, {n['failure'] + n['error']} failed, {n['skipped']} skipped\n")
        out.write(''.join(w + '\n' for w in why[f]))
print(open(sys.argv[2]).read())
PY
rm -rf "$SITE"
echo "[rehearsal] device_check.sh exit $check; results: $OUT/check/results.json, $OUT/tests.txt" >&2
