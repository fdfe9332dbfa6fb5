#!/usr/bin/env bash
# Builds the offline bundle that the GPU check (scripts/device_check.sh) needs on the lent GPU machine, which has
# Python 3.12 with torch 2.11.0+cu130 and no network, and takes at most 64 MiB per call (README, "GPU check").
#
#   bash scripts/device_bundle.sh            -> build/device/ (git-ignored): *.whl, MANIFEST.tsv, BUILD.txt
#
# Everything comes from locks in device/ (versions and sha256 hashes):
#   requirements-build.lock    a Python 3.12 venv with torch 2.11.0 (PyPI's CUDA 13.0 build; it also runs on CPU),
#                              the CUDA 13.0 compiler and headers from PyPI's nvidia-* packages, and the GPU
#                              machine's own packages (the same venv is the CPU rehearsal's, scripts/device_rehearsal.sh)
#   requirements-carry.lock    the wheels that travel (Python 3.12, manylinux x86_64): the pinned pure-Python stack
#                              the machine lacks (llm-foundry 0.22.0, composer 0.32.1, transformers 4.51.3, ...)
#   requirements-sources.lock  sdists compiled here: grouped-gemm 0.3.0 and megablocks 0.10.0 for sm_90 against
#                              torch 2.11.0 (megablocks patched with device/megablocks-0.10.0-cuda13.patch, upstream
#                              databricks/megablocks#180), and stanford-stk 0.7.1 (pure Python, sdist only)
# Needs a Python 3.12 interpreter (PYTHON312=..., python3.12 on PATH, pyenv's, or uv's) and the registry once.
# Cached under ~/.cache/foundry-upcycle/device (venv, sdists, built and downloaded wheels, keyed by the locks):
# a second run takes seconds. Fails if the bundle exceeds 60 MiB. MAX_JOBS (default 2) bounds the compile.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${DEVICE_BUNDLE_DIR:-build/device}
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/foundry-upcycle/device
LIMIT_MIB=60
ARCH=9.0  # H100 / H200
export MAX_JOBS=${MAX_JOBS:-2}
T0=$SECONDS
say() { echo "[device_bundle +$((SECONDS - T0))s] $*" >&2; }
sha() { cat "$@" | sha256sum | cut -c1-16; }
source scripts/_uv.sh
UV=$(uv_path)
mkdir -p "$CACHE"

find_python312() {
  local c
  for c in "${PYTHON312:-}" python3.12 $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 2>/dev/null | sort -rV); do
    if [ -n "$c" ] && "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then
      command -v "$c"
      return
    fi
  done
  "$UV" python find 3.12 2>/dev/null
}

# 1. The build venv: Python 3.12 + torch 2.11.0 + CUDA 13.0 compiler packages (+ the machine's own packages).
VENV=$CACHE/py312-torch2.11
want=$(sha device/requirements-build.lock)
if [ "$(cat "$VENV/.lock" 2>/dev/null)" != "$want" ]; then
  PY312=$(find_python312) || { echo "device_bundle: needs a Python 3.12 interpreter: set PYTHON312=/path/to/python3.12" \
    "(or install one: pyenv install 3.12, apt install python3.12, uv python install 3.12)" >&2; exit 1; }
  say "build venv: $PY312 + device/requirements-build.lock (torch 2.11.0, nvcc 13.0; first time ~5 GB) -> $VENV"
  rm -rf "$VENV"
  "$UV" venv -q "$VENV" --python "$PY312"
  "$UV" pip install -q --python "$VENV/bin/python" --require-hashes -r device/requirements-build.lock
  echo "$want" > "$VENV/.lock"
fi
PY=$VENV/bin/python

# 2. CUDA_HOME for torch's extension builder, assembled from the nvidia-* wheels (bin/nvcc, include, lib64/*.so).
NV=$("$PY" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')
export CUDA_HOME=$CACHE/cuda-13.0-$want
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  rm -rf "$CUDA_HOME" && mkdir -p "$CUDA_HOME/lib64"
  for d in bin include nvvm; do ln -s "$NV/$d" "$CUDA_HOME/$d"; done
  for f in "$NV"/lib/*.so*; do  # the wheels ship libX.so.N only; the linker wants libX.so too
    ln -sf "$f" "$CUDA_HOME/lib64/$(basename "$f")"
    ln -sf "$f" "$CUDA_HOME/lib64/$(basename "$f" | sed 's/\.so\..*/.so/')"
  done
fi
export TORCH_CUDA_ARCH_LIST=$ARCH PATH=$CUDA_HOME/bin:$PATH
NVCC=$("$CUDA_HOME/bin/nvcc" --version | tail -1)
TORCH=$("$PY" -c 'import torch; print(torch.__version__)')

# 3. Sources (hash-checked), then wheels built from them, cached by sdist + patch + torch + nvcc + arch.
SRC=$CACHE/src-$(sha device/requirements-sources.lock)
if [ ! -f "$SRC/.complete" ]; then
  say "downloading the sdists of device/requirements-sources.lock"
  rm -rf "$SRC"
  # pip prepares their metadata, which imports torch and reads CUDA_HOME: hence the build venv, no isolation
  "$PY" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: --no-build-isolation \
    --require-hashes -r device/requirements-sources.lock -d "$SRC"
  touch "$SRC/.complete"
fi
build_wheel() {  # name sdist [patch]
  local name=$1 sdist=$SRC/$2 patch=${3:-} key dir work
  key=$(sha "$sdist" ${patch:+"$patch"} <(echo "$ARCH $TORCH $NVCC"))
  dir=$CACHE/built/$name-$key
  if ! ls "$dir"/*.whl >/dev/null 2>&1; then
    say "building $name ($2${patch:+, patched with $patch}) for sm_${ARCH/./} against torch $TORCH, $NVCC; MAX_JOBS=$MAX_JOBS"
    work=$(mktemp -d)
    tar xzf "$sdist" -C "$work"
    if [ -n "$patch" ]; then (cd "$work"/*/ && patch -p1 --quiet) < "$patch"; fi
    "$PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w "$dir.tmp" "$work"/*/
    rm -rf "$work" "$dir" && mv "$dir.tmp" "$dir"
  fi
  BUILT+=("$dir"/*.whl)
}
BUILT=()
build_wheel stanford-stk stanford_stk-0.7.1.tar.gz
build_wheel grouped-gemm grouped_gemm-0.3.0.tar.gz
build_wheel megablocks megablocks-0.10.0.tar.gz device/megablocks-0.10.0-cuda13.patch

# 4. The wheels that travel as they are (hash-checked), for Python 3.12 on manylinux x86_64.
CARRY=$CACHE/carry-$(sha device/requirements-carry.lock)
if [ ! -f "$CARRY/.complete" ]; then
  say "downloading the wheels of device/requirements-carry.lock"
  rm -rf "$CARRY"
  plats=()
  for p in manylinux_2_28 manylinux_2_17 manylinux2014 manylinux_2_5 manylinux1; do plats+=(--platform "${p}_x86_64"); done
  "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${plats[@]}" --require-hashes -r device/requirements-carry.lock -d "$CARRY"
  touch "$CARRY/.complete"
fi

# 5. The bundle: copied fresh (never half-written: built beside, then renamed), with its manifest.
TMP=$OUT_DIR.tmp
rm -rf "$TMP" && mkdir -p "$TMP"
cp "$CARRY"/*.whl "${BUILT[@]}" "$TMP"/
{
  echo "built $(date -u +%FT%TZ) on $(uname -m) by scripts/device_bundle.sh"
  echo "torch $TORCH, $NVCC, TORCH_CUDA_ARCH_LIST=$ARCH, $("$PY" -V)"
  echo "locks: build $want carry $(sha device/requirements-carry.lock) sources $(sha device/requirements-sources.lock device/megablocks-0.10.0-cuda13.patch)"
} > "$TMP/BUILD.txt"
(cd "$TMP" && for f in *.whl; do printf '%s\t%s\t%s\n' "$(stat -c %s "$f")" "$(sha256sum "$f" | cut -c1-64)" "$f"; done \
  | sort -k3 > MANIFEST.tsv)
total=$(du -cb "$TMP"/* | tail -1 | cut -f1)
echo -e "$total\t-\tTOTAL ($(ls "$TMP"/*.whl | wc -l) wheels)" >> "$TMP/MANIFEST.tsv"
rm -rf "$OUT_DIR" && mv "$TMP" "$OUT_DIR"
mib=$(awk -v b="$total" 'BEGIN { printf "%.1f", b / 1048576 }')
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
  echo "device_bundle: $OUT_DIR is $mib MiB, over the $LIMIT_MIB MiB limit (the device takes 64 MiB per call," \
    "repository included): see $OUT_DIR/MANIFEST.tsv for the largest wheels" >&2
  exit 1
fi
say "done: $OUT_DIR, $(ls "$OUT_DIR"/*.whl | wc -l) wheels, $mib MiB (limit $LIMIT_MIB MiB); manifest $OUT_DIR/MANIFEST.tsv"
