# Sourced by scripts/setup.sh and scripts/device_bundle.sh: `uv_path` prints the path of the pinned uv: the one on
# PATH if it is that version, else a private copy bootstrapped once into a throwaway venv under ~/.cache (works on
# Debian/Ubuntu system Pythons, which refuse `pip install` outside a venv: PEP 668).
UV_VERSION=0.13.9

uv_path() {
  if command -v uv >/dev/null 2>&1 && [ "$(uv --version | cut -d' ' -f2)" = "$UV_VERSION" ]; then
    command -v uv
    return
  fi
  local dir="${XDG_CACHE_HOME:-$HOME/.cache}/foundry-upcycle/uv-$UV_VERSION"
  if [ ! -f "$dir/.complete" ]; then
    echo "[setup] bootstrapping uv $UV_VERSION into $dir" >&2
    rm -rf "$dir"
    python3 -m venv "$dir" >&2 || { echo "[setup] 'python3 -m venv' failed (Debian/Ubuntu: apt install python3-venv)" >&2; exit 1; }
    "$dir/bin/python" -m pip install -q --disable-pip-version-check "uv==$UV_VERSION" >&2
    touch "$dir/.complete"
  fi
  echo "$dir/bin/uv"
}
