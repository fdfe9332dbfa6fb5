"""The inter-process lock around streaming's shared-memory prefix registration (study/workers.py): processes that
register at the same moment take turns, and wrapping twice wraps once."""
from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import streaming.base.dataset as sd

from foundry_upcycle.study import workers

ROUNDS = 4
PROCESSES = 3


def _register_in_a_child(lock_path: str, log_path: str, start_at: float) -> None:
    """A child process whose `get_shm_prefix` is streaming's race in slow motion: it logs its entry, holds the
    "check-then-create" window for 50 ms, then logs its exit. Wrapped by the lock, no two windows may overlap."""
    def slow_prefix(*args, **kwargs):
        with open(log_path, 'a') as f:
            f.write(f'enter {os.getpid()}\n')
        time.sleep(0.05)
        with open(log_path, 'a') as f:
            f.write(f'exit {os.getpid()}\n')
        return 'prefix', 'locals'
    sd.get_shm_prefix = slow_prefix
    workers._LOCK_PATH = lock_path
    workers.serialize_streaming_prefix()
    time.sleep(max(0.0, start_at - time.time()))        # all children register at the same moment
    for _ in range(ROUNDS):
        assert sd.get_shm_prefix() == ('prefix', 'locals')


def test_concurrent_registrations_take_turns(tmp_path):
    log = tmp_path / 'log'
    ctx = multiprocessing.get_context('fork')
    start_at = time.time() + 1.0
    procs = [ctx.Process(target=_register_in_a_child, args=(str(tmp_path / 'lock'), str(log), start_at))
             for _ in range(PROCESSES)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    lines = Path(log).read_text().split()
    events = list(zip(lines[0::2], lines[1::2]))
    assert len(events) == 2 * ROUNDS * PROCESSES
    for (enter, pid), (leave, pid2) in zip(events[0::2], events[1::2]):
        assert (enter, leave) == ('enter', 'exit') and pid == pid2, 'two registrations overlapped'


def test_wrapping_is_idempotent(monkeypatch):
    def original(*args, **kwargs):
        return 'p', 'l'
    monkeypatch.setattr(sd, 'get_shm_prefix', original)
    workers.serialize_streaming_prefix()
    wrapped = sd.get_shm_prefix
    workers.serialize_streaming_prefix()
    assert sd.get_shm_prefix is wrapped and wrapped is not original and wrapped() == ('p', 'l')
    assert wrapped.__wrapped__ is original


def test_a_registration_that_loses_the_race_to_an_outside_process_is_retried(monkeypatch, tmp_path):
    """Processes that are not ours do not take the lock: a registration that finds its prefix taken between check
    and create (FileExistsError) is retried, and picks another."""
    calls = []

    def racy(*args, **kwargs):
        calls.append(1)
        if len(calls) < 3:
            raise FileExistsError(17, 'File exists', '/000820_locals')
        return 821, 'shm'
    monkeypatch.setattr(sd, 'get_shm_prefix', racy)
    monkeypatch.setattr(workers, '_LOCK_PATH', str(tmp_path / 'lock'))
    workers.serialize_streaming_prefix()
    assert sd.get_shm_prefix() == (821, 'shm') and len(calls) == 3

    def always(*args, **kwargs):
        raise FileExistsError(17, 'File exists', '/000820_locals')
    monkeypatch.setattr(sd, 'get_shm_prefix', always)
    workers.serialize_streaming_prefix()
    try:
        sd.get_shm_prefix()
        raise AssertionError('a prefix that stays taken must raise')
    except FileExistsError:
        pass
