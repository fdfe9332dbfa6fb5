"""Release what streaming's datasets hold once a run is over, in a process that trains many runs (a study worker,
the test session).

Streaming 0.12 keeps a finished dataset's resources until the process exits:
- every `streaming.base.shared.memory.SharedMemory` registers `atexit.register(self.cleanup)`, so the atexit list
  holds it (and its open file descriptor) for the life of the process, whether or not a dataset still uses it;
- each new dataset attaches to every earlier dataset's shared memory while it looks for a free prefix
  (`shared/prefix.py`), and those attachments are referenced only by that atexit list;
- an epoch that is not run to its end (a run that stops at `max_duration` mid-epoch, an eval subset) leaves its
  `_ready_thread` polling forever, which keeps the dataset alive.
So descriptors grow with every run (a single tiny run leaves 80-300 open; the suite hit the 1024 limit). `release`
stops the given datasets' threads and closes their shared memory and every orphaned attachment; datasets still in
use (the held-out splits a study worker keeps) are left alone.
"""
from __future__ import annotations

import atexit
import gc
import logging
import types
from typing import Any, Iterable

log = logging.getLogger(__name__)
JOIN_SECONDS = 2.0


def trainer_datasets(trainer: Any) -> list[Any]:
    """The datasets of a Composer trainer's train and eval dataloaders."""
    loaders = [trainer.state.train_dataloader]
    loaders += [getattr(e.dataloader, 'dataloader', None) for e in (trainer.state.evaluators or [])]
    return [dl.dataset for dl in loaders if dl is not None and hasattr(dl, 'dataset')]


def _owned_memory(dataset: Any) -> list[Any]:
    """The streaming SharedMemory objects a dataset holds directly or through SharedArray/Scalar/Barrier."""
    from streaming.base.shared.memory import SharedMemory
    found = []
    for value in vars(dataset).values():
        for obj in (value, getattr(value, 'shm', None), getattr(getattr(value, 'arr', None), 'shm', None),
                    getattr(getattr(value, '_arr', None), 'shm', None)):
            if isinstance(obj, SharedMemory):
                found.append(obj)
    return found


def _orphans(memories: list[Any]) -> list[Any]:
    """The SharedMemory objects of `memories` that nothing refers to but their own bound `cleanup` (the atexit
    entry). Lists and frames are not counted as holders (streaming keeps its memory in attributes; a list here is
    a gc.get_objects() result, a frame a caller's loop variable)."""
    by_id = {id(m): m for m in memories}
    bound, held = set(), set()
    for ref in gc.get_referrers(*memories):
        if ref is by_id or isinstance(ref, (list, types.FrameType)):
            continue
        for obj in gc.get_referents(ref):
            if id(obj) in by_id:
                (bound if isinstance(ref, types.MethodType) and ref.__self__ is obj else held).add(id(obj))
    return [by_id[i] for i in bound - held]


def _close(shm: Any) -> None:
    atexit.unregister(shm.cleanup)
    try:
        shm.cleanup()
    except (BufferError, OSError):      # a numpy view still exports the buffer; the fd goes with the object
        pass


def release(datasets: Iterable[Any] = ()) -> int:
    """Stops `datasets`' background threads, closes their shared memory and every orphaned attachment; returns the
    number of SharedMemory objects closed. Do not pass a dataset that will be iterated again."""
    import sys
    if 'streaming' not in sys.modules:
        return 0
    from streaming import StreamingDataset
    from streaming.base.shared.memory import SharedMemory
    datasets = [d for d in datasets if isinstance(d, StreamingDataset)]
    for ds in datasets:
        if getattr(ds, '_iterator', None) is not None:
            ds._iterator.exit()
        if getattr(ds, '_executor', None) is not None:
            ds._executor.shutdown(wait=False)
            for thread in list(getattr(ds._executor, '_threads', ())):
                thread.join(timeout=JOIN_SECONDS)   # they poll the exit flag every few ms
                if thread.is_alive():
                    log.warning('a streaming thread of a finished dataset did not stop within %ss; its memory '
                                'stays open', JOIN_SECONDS)
    owned = [shm for ds in datasets for shm in _owned_memory(ds)]
    gc.collect()
    orphans = _orphans([o for o in gc.get_objects() if type(o) is SharedMemory])   # type(): isinstance wakes lazy proxies
    closing = {id(s): s for s in owned + orphans}
    for shm in closing.values():
        _close(shm)
    return len(closing)
