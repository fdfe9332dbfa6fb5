"""Resumable stages: stage `name` lives in `<out>/<name>/` with a `stage.json` holding a hash of its inputs.

Every hash also holds the `salt` the study passes in: this package's version and the bytes of the recipe files it
trains with, so an upgrade or an edited recipe (even a comment) is never mistaken for a finished stage.

A finished stage whose hash matches is skipped; a changed one is redone, and so is everything downstream, whose
hashes include it. A stage builds in `<out>/.<name>.partial-<hash>/` and is renamed into place when done; a killed
training stage resumes from its own checkpoints (the recipes set `autoresume: true`), any other stage starts over.
Inputs must hold no absolute paths (results must not depend on where the study runs).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

STUDY_FORMAT = 3                 # bump when a stage's outputs change meaning


class Progress:
    """One line per stage on stderr: elapsed time, stage number, what runs or why it is skipped."""

    def __init__(self, enabled: bool, total: int = 0):
        self.enabled, self.total, self.done = enabled, total, 0
        self.start = time.monotonic()

    def say(self, msg: str) -> None:
        if self.enabled:
            print(f'[study {self.elapsed():6.0f}s] {msg}', file=sys.stderr, flush=True)

    def stage(self, msg: str) -> None:
        self.done += 1
        self.say(f'({self.done}/{self.total}) {msg}')

    def elapsed(self) -> float:
        return time.monotonic() - self.start


def config_hash(inputs: Any) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class StageResult:
    name: str
    hash: str
    dir: Path
    outputs: dict[str, Any]
    seconds: float
    ran: bool


class Stages:
    """Runs `fn(work_dir) -> outputs` for a stage unless `<out>/<name>/stage.json` holds the same input hash."""

    def __init__(self, out: Path, progress: Progress, salt: Optional[Mapping[str, Any]] = None):
        self.out, self.progress, self.salt = out, progress, dict(salt or {})
        self.ran: list[str] = []
        self.skipped: list[str] = []
        self.ran_in_workers: set[str] = set()    # stages a worker process ran (study/workers.py)

    def read(self, name: str) -> Optional[dict[str, Any]]:
        try:
            meta = json.loads((self.out / name / 'stage.json').read_text())
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) and meta.get('status') == 'done' else None

    def done(self, name: str, inputs: Mapping[str, Any]) -> bool:
        """Stage `name` is finished with these inputs (run() would skip it)."""
        return self._finished(name, _hash(name, inputs, self.salt), self.read(name))

    def _finished(self, name: str, h: str, meta: Optional[dict[str, Any]]) -> bool:
        return meta is not None and meta.get('hash') == h and _outputs_present(self.out / name, meta['outputs'])

    def run(self, name: str, inputs: Mapping[str, Any], fn: Callable[[Path], dict[str, Any]], what: str,
            resumable: bool = False) -> StageResult:
        """resumable: a killed run's work folder is kept and `fn` resumes in it (foundry autoresume)."""
        final = self.out / name
        h = _hash(name, inputs, self.salt)
        meta = self.read(name)
        if self._finished(name, h, meta):
            seconds = meta.get('seconds', 0.0)
            if name in self.ran_in_workers:
                self.progress.stage(f'{what}: done in a worker process in {seconds:.0f}s')
                self.ran.append(name)
                return StageResult(name, h, final, meta['outputs'], seconds, ran=True)
            self.progress.stage(f'{what}: up to date, skipped ({final}, config {h})')
            self.skipped.append(name)
            return StageResult(name, h, final, meta['outputs'], seconds, ran=False)
        why = 'config changed, redoing' if meta is not None else 'running'
        self.progress.stage(f'{what}: {why}')
        final.parent.mkdir(parents=True, exist_ok=True)
        work = final.parent / f'.{final.name}.partial-{h}'
        for stale in final.parent.glob(f'.{final.name}.partial-*'):
            if stale != work:
                shutil.rmtree(stale, ignore_errors=True)
        if work.exists() and not resumable:
            shutil.rmtree(work)
        if work.exists():
            self.progress.say(f'  resuming from {work}')
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        outputs = fn(work)
        seconds = round(time.monotonic() - t0, 2)
        meta = {'stage': name, 'status': 'done', 'hash': h, 'seconds': seconds, 'inputs': inputs, 'outputs': outputs}
        (work / 'stage.json').write_text(json.dumps(meta, indent=1, sort_keys=True, default=str) + '\n')
        _swap_into_place(work, final)
        self.ran.append(name)
        self.progress.say(f'  done in {seconds:.0f}s')
        return StageResult(name, h, final, outputs, seconds, ran=True)


def _hash(name: str, inputs: Mapping[str, Any], salt: Mapping[str, Any]) -> str:
    return config_hash({'format': STUDY_FORMAT, 'stage': name, **inputs, **({'salt': dict(salt)} if salt else {})})


def code_salt(recipe_files: Mapping[str, Path]) -> dict[str, Any]:
    """The package's version and the sha256 of each recipe file (by kind): part of every stage's hash."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        package = version('foundry-upcycle')
    except PackageNotFoundError:
        package = 'unknown'
    return {'package': package, 'recipes': {kind: hashlib.sha256(p.read_bytes()).hexdigest()[:16]
                                            for kind, p in recipe_files.items() if p.is_file()}}


def _outputs_present(stage_dir: Path, outputs: Mapping[str, Any]) -> bool:
    """A finished stage's checkpoint is still there (a user may have deleted it)."""
    ckpt = outputs.get('checkpoint')
    return ckpt is None or (stage_dir / ckpt).is_file()  # an absolute path joins as itself


def _swap_into_place(work: Path, final: Path) -> None:
    old = final.parent / f'.{final.name}.old-{os.getpid()}'
    if final.exists():
        os.replace(final, old)
    os.replace(work, final)
    shutil.rmtree(old, ignore_errors=True)
