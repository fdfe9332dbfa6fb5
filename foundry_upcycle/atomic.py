"""Writing outputs all-or-nothing. Standard library only.

A file or directory appears under its final name only when complete: it is built beside the target
(`.<name>.<tag>-tmp-<pid>-<random>`) and renamed at the end. A killed run leaves only such a temp entry, which
the next run with the same tag removes once the process that made it is gone.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Iterator

log = logging.getLogger(__name__)


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Calls write(tmp_path) on a temp file beside `path`, then renames it into place; nothing is left on failure."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{dest.name}.', suffix='.tmp', dir=dest.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(dest: Path, tag: str) -> None:
    pattern = re.compile(rf'^\.{re.escape(dest.name)}\.{re.escape(tag)}-(tmp|old)-(\d+)-[0-9a-f]+$')
    for p in dest.parent.iterdir():
        m = pattern.match(p.name)
        if m and not _pid_alive(int(m[2])):
            log.warning('removing %s, left by an interrupted run', p)
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, tag: str, overwrite: bool = False) -> Iterator[Path]:
    """Yields a fresh temp dir beside `out`; on clean exit it becomes `out`, on any error it is removed.

    An existing non-empty `out` is refused unless overwrite=True (then it is replaced only at the end).
    """
    dest = Path(out).expanduser().absolute()
    if dest.exists() and not dest.is_dir():
        raise ValueError(f'output {dest} exists and is not a directory')
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise ValueError(f'output {dest} exists and is not empty; choose another directory or pass overwrite')
    dest.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(dest, tag)
    suffix = f'{os.getpid()}-{uuid.uuid4().hex[:8]}'
    tmp = dest.parent / f'.{dest.name}.{tag}-tmp-{suffix}'
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if dest.exists():
            old = dest.parent / f'.{dest.name}.{tag}-old-{suffix}'
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_files(out_dir: str | os.PathLike, writers: dict[str, Callable[[str], object]]) -> dict[str, str]:
    """Writes several files into `out_dir` (which may hold other things): every writer runs on a temp file first;
    only when all have succeeded are they renamed into place, in the given order (put the main file last).
    A failing writer leaves none of them behind, and any older versions untouched."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f'output {out} exists and is not a directory')
    out.mkdir(parents=True, exist_ok=True)
    tmps: dict[str, str] = {}
    try:
        for name, write in writers.items():
            fd, tmps[name] = tempfile.mkstemp(prefix=f'.{name}.', suffix='.tmp', dir=out)
            os.close(fd)
            write(tmps[name])
        for name in writers:
            os.replace(tmps.pop(name), out / name)
    finally:
        for tmp in tmps.values():
            Path(tmp).unlink(missing_ok=True)
    return {name: str(out / name) for name in writers}
