#!/usr/bin/env bash
# Creates .venv (Python 3.11) with the pinned CPU stack and foundry-upcycle installed editable.
# Idempotent: a second run with an up-to-date venv takes a few seconds.
#   bash scripts/setup.sh --gpu   CUDA machines: requirements-gpu.lock (the CPU lock + megablocks 0.10.0, grouped-gemm,
#                                 stanford-stk, flash-attn; numpy 2.0.2 / packaging 24.1 as megablocks requires); the
#                                 CUDA source builds run with --no-build-isolation against the installed torch (needs
#                                 nvcc for torch's CUDA 12.6; flash-attn can take long to compile: MAX_JOBS=N).
# uv: the pinned version, from PATH or bootstrapped once under ~/.cache (scripts/_uv.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
LOCK=requirements.lock
SOURCE_BUILDS='^(megablocks|grouped-gemm|stanford-stk|flash-attn)=='
if [ "${1:-}" = "--gpu" ]; then LOCK=requirements-gpu.lock; elif [ -n "${1:-}" ]; then echo "usage: $0 [--gpu]" >&2; exit 2; fi

source scripts/_uv.sh
UV=$(uv_path)
[ -x .venv/bin/python ] || "$UV" venv -q .venv --python 3.11
stamp=.venv/.foundry-upcycle-lock
want=$(cat "$LOCK" pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing pinned stack ($LOCK) into .venv (first time: ~1 min, ~6.5 GB)" >&2
  "$UV" pip install -q --python .venv/bin/python -r <(grep -vE "$SOURCE_BUILDS" "$LOCK")
  if [ "$LOCK" != requirements.lock ]; then  # they import torch to build: after it, without build isolation
    echo "[setup] building the CUDA extras from source (--no-build-isolation)" >&2
    "$UV" pip install -q --python .venv/bin/python --no-build-isolation --no-deps $(grep -E "$SOURCE_BUILDS" "$LOCK")
  fi
  "$UV" pip install -q --python .venv/bin/python --no-deps -e .
  echo "$want" > "$stamp"
fi
