"""Streaming keeps each finished dataset's shared memory, file descriptors and polling thread until the process
exits; `streaming_memory.release` frees them between runs without touching a dataset still in use."""
from __future__ import annotations

import os
import threading

from conftest import run_train, tiny_recipe


def open_fds() -> int:
    return len(os.listdir('/proc/self/fd'))


def fd_targets() -> list[str]:
    out = []
    for fd in os.listdir('/proc/self/fd'):
        try:
            out.append(os.readlink(f'/proc/self/fd/{fd}'))
        except OSError:         # the listing's own descriptor
            pass
    return sorted(out)


def test_release_frees_a_finished_run_and_keeps_a_live_dataset(corpus, tmp_path):
    from transformers import AutoTokenizer

    from foundry_upcycle.study.heldout import open_split
    from foundry_upcycle.study.streaming_memory import release, trainer_datasets

    live = open_split(AutoTokenizer.from_pretrained(str(corpus['tokenizer'])), corpus['generic'] / 'val', 32, 4)
    first = [s.tolist() if hasattr(s, 'tolist') else s for s in list(live)[:3]]
    release()
    warm = run_train(tiny_recipe('tiny/pretrain.yaml', corpus, tmp_path / 'warm'))   # one-time process resources
    release(trainer_datasets(warm))
    warm.close()
    del warm
    fds, threads = open_fds(), threading.active_count()
    before = fd_targets()

    trainer = run_train(tiny_recipe('tiny/pretrain.yaml', corpus, tmp_path / 'a'))
    leaked = open_fds() - fds
    assert leaked > 20, f'control: a stopped mid-epoch run should hold streaming fds ({leaked}); recheck the premise'
    closed = release(trainer_datasets(trainer))
    trainer.close()
    del trainer
    assert closed > 0
    after = fd_targets()
    changed = [(t, before.count(t), after.count(t)) for t in sorted(set(after)) if after.count(t) != before.count(t)]
    assert open_fds() <= fds + 2, changed
    assert threading.active_count() <= threads, 'a streaming thread of the finished run is still running'

    again = [s.tolist() if hasattr(s, 'tolist') else s for s in list(live)[:3]]   # the live split still reads
    assert again == first
