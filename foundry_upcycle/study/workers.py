"""Phase-2 runs in parallel: each CPT / upcycling run trains in its own worker process with one torch thread.

The runs of a study are independent once the dense base exists, and one run of these tiny models uses one core, so
on an N-core machine `jobs` runs at a time finish ~`jobs` times sooner with the same numbers: a run's result depends
only on its config, its seed and the thread count, not on the process it trains in (`tests/test_study.py` checks a
study with jobs 1 against jobs 2). A worker runs the same stage function the main process would; the main process
then finds each stage done and reads its outputs.

Streaming registers every dataset under a shared-memory prefix with a check-then-create that is not atomic across
processes: two datasets created at the same moment in two processes can pick the same prefix and one dies with
`FileExistsError: '/000123_locals'`. `serialize_streaming_prefix` puts a file lock around that registration, and,
because processes that are not ours (another job on the machine) do not take the lock, retries a registration that
lost the race: the retry sees the prefix taken and picks the next free one.
"""
from __future__ import annotations

import fcntl
import functools
import logging
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any, Callable, Mapping, Sequence

RunKey = tuple[str, float, int, float]          # (arm, budget, seed index, lr)
_LOCK_PATH = os.path.join(tempfile.gettempdir(), 'foundry-upcycle-streaming-prefix.lock')
RETRIES = 5
_study = None                                    # the worker's Study (set by _init)
_dense = None


def serialize_streaming_prefix() -> None:
    """Wraps streaming's shared-memory prefix registration in an inter-process file lock (idempotent)."""
    import streaming.base.dataset as sd
    original = sd.get_shm_prefix
    if getattr(original, '_foundry_upcycle_locked', False):
        return

    @functools.wraps(original)
    def locked(*args: Any, **kwargs: Any):
        with open(_LOCK_PATH, 'a+') as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                for attempt in range(RETRIES):
                    try:
                        return original(*args, **kwargs)
                    except FileExistsError:      # a process outside the lock took the prefix between check and create
                        if attempt == RETRIES - 1:
                            raise
                        time.sleep(0.05 * (attempt + 1))
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
    locked._foundry_upcycle_locked = True
    sd.get_shm_prefix = locked


def _init(study_cls: Callable[[Any], Any], cfg: Any) -> None:
    """Worker start: the same Study (`study_cls(cfg)`) over the same out folder, its data and dense base built."""
    global _study, _dense
    import torch
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    logging.basicConfig(level=logging.WARNING)
    for noisy in ('composer', 'streaming', 'llmfoundry'):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from foundry_upcycle.study.evaluate import set_offline_env
    set_offline_env()
    serialize_streaming_prefix()
    study = study_cls(cfg)
    study.nproc = 1
    study.stage_data()
    study.plan = study.make_plan()
    _dense = study.stage_dense()
    assert not _dense.ran, 'a worker must find the dense base already trained'
    _study = study


def _train(key: RunKey, icl: bool) -> tuple[RunKey, float]:
    from foundry_upcycle.study.arms import run_name
    arm, budget, seed_index, lr = key
    stage = _study.stage_arm(arm, budget, _dense, seed_index, lr)
    _study.stage_eval(run_name(arm, budget, lr, seed_index), stage, icl=icl)
    return key, stage.seconds


def train_in_workers(study_cls: Callable[[Any], Any], cfg: Any, keys: Sequence[RunKey], jobs: int,
                     icl: Mapping[RunKey, bool], done: Callable[[RunKey, float], None]) -> None:
    """Trains `keys` in `jobs` worker processes (spawned: no state shared with this one; cfg.threads torch threads
    and a `study_cls(cfg)` each: the Study class, pickled by reference, so this module never imports the pipeline),
    each run followed by its evaluation as the main process would run it (with the gauntlet if `icl[key]`);
    `done(key, seconds)` after each. The first failure cancels the queued runs and is raised here."""
    ctx = multiprocessing.get_context('spawn')
    quiet = cfg.replace(progress=False)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init, initargs=(study_cls, quiet)) as pool:
        pending: set[Future] = {pool.submit(_train, key, icl[key]) for key in keys}
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in finished:
                    key, seconds = f.result()
                    done(key, seconds)
        except BaseException:
            for f in pending:
                f.cancel()
            raise
