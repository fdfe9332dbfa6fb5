"""scripts/setup.sh on a Debian/Ubuntu system Python that refuses `pip install` (PEP 668) and has no uv on PATH."""
from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
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


def _uv_wheel_dir() -> Path:
    """A folder holding the pinned uv's wheel, downloaded once per machine (the bootstrap then installs from it
    with no index: a fresh HOME does not download uv every run); skips when the registry cannot be reached."""
    uv_version = next(line.split('=')[1] for line in (REPO / 'scripts' / '_uv.sh').read_text().splitlines()
                      if line.startswith('UV_VERSION='))
    cache = Path(os.environ.get('XDG_CACHE_HOME', Path.home() / '.cache')) / 'foundry-upcycle' / 'test-wheels'
    if not list(cache.glob(f'uv-{uv_version}-*.whl')):
        got = subprocess.run([str(SYSTEM_PYTHON), '-m', 'pip', 'download', '-q', '--no-deps', '--only-binary', ':all:',
                              '-d', str(cache), f'uv=={uv_version}'], capture_output=True, text=True, timeout=300)
        if got.returncode != 0 or not list(cache.glob(f'uv-{uv_version}-*.whl')):
            pytest.skip(f'cannot download uv {uv_version} to pre-seed the bootstrap (offline?): {got.stderr[-300:]}')
    return cache


@pytest.mark.slow
@pytest.mark.skipif(not _externally_managed(), reason='needs a PEP 668 system Python at /usr/bin/python3')
def test_setup_works_where_system_pip_is_refused(tmp_path):
    wheels = _uv_wheel_dir()
    repo = tmp_path / 'repo'
    (repo / 'scripts').mkdir(parents=True)
    for name in ('pyproject.toml', 'requirements.lock', 'scripts/setup.sh', 'scripts/_uv.sh'):
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
    env = {'PATH': f'{bin_dir}:/usr/bin:/bin', 'HOME': str(tmp_path / 'home'), 'LANG': 'C.UTF-8',
           'PIP_NO_INDEX': '1', 'PIP_FIND_LINKS': str(wheels)}  # the bootstrap installs the pre-seeded wheel
    refused = subprocess.run(['python3', '-m', 'pip', 'install', '--dry-run', 'uv'], env=env, capture_output=True,
                             text=True)
    assert refused.returncode != 0  # what the old `python3 -m pip install uv` ran into
    first = subprocess.run(['bash', 'scripts/setup.sh'], cwd=repo, env=env, capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert 'bootstrapping uv 0.13.9' in first.stderr
    uv = tmp_path / 'home' / '.cache' / 'foundry-upcycle' / 'uv-0.13.9' / 'bin' / 'uv'
    assert subprocess.run([str(uv), '--version'], capture_output=True, text=True).stdout.startswith('uv 0.13.9')
    stamp = repo / '.venv' / '.foundry-upcycle-lock'
    before = stamp.stat().st_mtime_ns
    second = subprocess.run(['bash', 'scripts/setup.sh'], cwd=repo, env=env, capture_output=True, text=True,
                            timeout=120)
    assert second.returncode == 0, second.stderr
    # idempotent: no bootstrap and no install step ran, the stamp was not rewritten
    assert 'bootstrapping' not in second.stderr and '[setup] installing' not in second.stderr, second.stderr
    assert stamp.stat().st_mtime_ns == before


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
