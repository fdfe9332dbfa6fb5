"""scripts/setup.sh on a Debian/Ubuntu system Python that refuses `pip install` (PEP 668) and has no uv on PATH."""
from __future__ import annotations

import shutil
import subprocess
import sysconfig
import time
from pathlib import Path

import pytest

from conftest import REPO

SYSTEM_PYTHON = Path('/usr/bin/python3')


def _externally_managed() -> bool:
    if not SYSTEM_PYTHON.exists():
        return False
    stdlib = subprocess.run([str(SYSTEM_PYTHON), '-c', 'import sysconfig; print(sysconfig.get_path("stdlib"))'],
                            capture_output=True, text=True).stdout.strip()
    return (Path(stdlib) / 'EXTERNALLY-MANAGED').exists()


@pytest.mark.slow
@pytest.mark.skipif(not _externally_managed(), reason='needs a PEP 668 system Python at /usr/bin/python3')
def test_setup_works_where_system_pip_is_refused(tmp_path):
    repo = tmp_path / 'repo'
    (repo / 'scripts').mkdir(parents=True)
    for name in ('pyproject.toml', 'requirements.lock', 'scripts/setup.sh'):
        shutil.copy(REPO / name, repo / name)
    # an up-to-date venv: setup.sh then only has to find uv (the part PEP 668 broke)
    (repo / '.venv' / 'bin').mkdir(parents=True)
    (repo / '.venv' / 'bin' / 'python').symlink_to(Path(sysconfig.get_paths()['scripts']) / 'python')
    want = subprocess.run('cat requirements.lock pyproject.toml | sha256sum | cut -d" " -f1', shell=True,
                          cwd=repo, capture_output=True, text=True, check=True).stdout
    (repo / '.venv' / '.foundry-upcycle-lock').write_text(want)
    bin_dir = tmp_path / 'bin'  # PATH: the system python3 and coreutils, no uv
    bin_dir.mkdir()
    (bin_dir / 'python3').symlink_to(SYSTEM_PYTHON)
    env = {'PATH': f'{bin_dir}:/usr/bin:/bin', 'HOME': str(tmp_path / 'home'), 'LANG': 'C.UTF-8'}
    refused = subprocess.run(['python3', '-m', 'pip', 'install', '--dry-run', 'uv'], env=env, capture_output=True,
                             text=True)
    assert refused.returncode != 0  # what the old `python3 -m pip install uv` ran into
    first = subprocess.run(['bash', 'scripts/setup.sh'], cwd=repo, env=env, capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert 'bootstrapping uv 0.13.9' in first.stderr
    uv = tmp_path / 'home' / '.cache' / 'foundry-upcycle' / 'uv-0.13.9' / 'bin' / 'uv'
    assert subprocess.run([str(uv), '--version'], capture_output=True, text=True).stdout.startswith('uv 0.13.9')
    start = time.time()
    second = subprocess.run(['bash', 'scripts/setup.sh'], cwd=repo, env=env, capture_output=True, text=True)
    assert second.returncode == 0 and 'bootstrapping' not in second.stderr, second.stderr
    assert time.time() - start < 10  # idempotent and fast


def test_gpu_lock_is_the_cpu_lock_plus_megablocks_with_its_bounds():
    def pins(name):
        lines = (REPO / name).read_text().splitlines()
        return dict(line.split('==') for line in lines if '==' in line and not line.lstrip().startswith('#'))
    cpu, gpu = pins('requirements.lock'), pins('requirements-gpu.lock')
    changed = {k for k in cpu if gpu.get(k) != cpu[k]}
    assert changed <= {'numpy', 'packaging'}, changed
    assert set(gpu) - set(cpu) == {'megablocks', 'grouped-gemm', 'stanford-stk', 'flash-attn'}
    assert gpu['megablocks'] == '0.10.0' and gpu['torch'] == cpu['torch'] == '2.7.0'
    major, minor = map(int, gpu['numpy'].split('.')[:2])
    assert (major, minor) < (2, 1)  # megablocks 0.10.0: numpy<2.1
    assert tuple(map(int, gpu['packaging'].split('.')[:2])) < (24, 2)  # megablocks 0.10.0: packaging<24.2
