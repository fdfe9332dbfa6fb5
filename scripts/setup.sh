#!/usr/bin/env bash
# Creates .venv (Python 3.11) with the pinned CPU stack and foundry-upcycle installed editable.
# Idempotent: a second run with an up-to-date venv takes a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.9
if ! command -v uv >/dev/null 2>&1 || [ "$(uv --version | cut -d' ' -f2)" != "$UV_VERSION" ]; then
  python3 -m pip install -q --disable-pip-version-check "uv==$UV_VERSION"
fi
[ -x .venv/bin/python ] || uv venv -q .venv --python 3.11
stamp=.venv/.foundry-upcycle-lock
want=$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing pinned stack into .venv (first time: ~1 min, ~6.5 GB)" >&2
  uv pip install -q --python .venv/bin/python -r requirements.lock
  uv pip install -q --python .venv/bin/python --no-deps -e .
  echo "$want" > "$stamp"
fi
