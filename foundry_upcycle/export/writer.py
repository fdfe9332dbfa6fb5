"""Writing Hugging Face checkpoint directories: atomically, and streaming tensors into safetensors shards.

A directory appears under its final name only when complete: it is built in a temp dir beside the target
(`.<name>.<tag>-tmp-<pid>-<random>`) and renamed at the end. A killed run leaves only such a temp dir, which
the next run of the same tool removes once its process is gone.

Shards are written tensor by tensor from a plan of jobs (`jobs.py`): the plan (names, shapes, dtypes) is fixed before any data is read, so
each safetensors header can be written first and each tensor's bytes appended as it is produced. Memory is
bounded by the largest single job (one source tensor and what it expands to), not by the shard or model.
Imports torch, tqdm and the standard library only.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from foundry_upcycle.jobs import (SAFETENSORS_DTYPES, TORCH_DTYPES, Job, TensorSpec, in_memory_jobs,  # noqa: F401
                                  run_job)

log = logging.getLogger(__name__)

INDEX_NAME = 'model.safetensors.index.json'
SINGLE_NAME = 'model.safetensors'


# ---------------------------------------------------------------- streaming safetensors shards

def plan_shards(jobs: Sequence[Job], max_shard_bytes: int) -> list[list[Job]]:
    """Greedy packing in order; a job is never split across shards (so one job may exceed the limit)."""
    shards: list[list[Job]] = [[]]
    size = 0
    for job in jobs:
        if shards[-1] and size + job.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(job)
        size += job.nbytes
    return shards


def _header(specs: Sequence[TensorSpec], metadata: Optional[dict[str, str]]) -> bytes:
    header: dict = {'__metadata__': dict(metadata or {'format': 'pt'})}
    offset = 0
    for s in specs:
        if s.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f'{s.name}: dtype {s.dtype} cannot be stored in safetensors')
        header[s.name] = {'dtype': SAFETENSORS_DTYPES[s.dtype], 'shape': list(s.shape),
                          'data_offsets': [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(',', ':')).encode()
    return raw + b' ' * (-len(raw) % 8)  # the format aligns the data start to 8 bytes


def _write_bytes(f, t: torch.Tensor) -> None:
    if t.numel():
        f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def write_safetensors_stream(path: Path, jobs: Sequence[Job], metadata: Optional[dict[str, str]] = None,
                             on_job: Optional[Callable[[Job], None]] = None) -> None:
    """Writes one safetensors file from `jobs`, one job in memory at a time, and fsyncs it."""
    specs = [s for job in jobs for s in job.specs]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f'{path.name}: duplicate tensor names')
    header = _header(specs, metadata)
    with open(path, 'wb') as f:
        f.write(struct.pack('<Q', len(header)))
        f.write(header)
        for job in jobs:
            for _, t in run_job(job):  # one tensor at a time
                _write_bytes(f, t)
                del t
            if on_job is not None:
                on_job(job)
        f.flush()
        os.fsync(f.fileno())


def shard_names(n: int) -> list[str]:
    return [SINGLE_NAME] if n == 1 else [f'model-{i + 1:05d}-of-{n:05d}.safetensors' for i in range(n)]


def write_sharded(out_dir: Path, jobs: Sequence[Job], max_shard_bytes: int, desc: str = 'writing tensors',
                  progress: bool = True) -> list[Path]:
    """Writes `jobs` as model.safetensors, or as numbered shards plus model.safetensors.index.json."""
    from tqdm.auto import tqdm

    shards = plan_shards(jobs, max_shard_bytes)
    names = shard_names(len(shards))
    total = sum(job.nbytes for job in jobs)
    paths = []
    with tqdm(total=sum(len(j.specs) for j in jobs), desc=desc, unit='tensor', disable=not progress) as bar:
        for name, shard in zip(names, shards):
            write_safetensors_stream(out_dir / name, shard, on_job=lambda job: bar.update(len(job.specs)))
            paths.append(out_dir / name)
    if len(shards) > 1:
        weight_map = {s.name: name for name, shard in zip(names, shards) for job in shard for s in job.specs}
        index = {'metadata': {'total_size': total}, 'weight_map': weight_map}
        (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + '\n')
    return paths


# ---------------------------------------------------------------- tokenizer files

TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'tokenizer.model',
                   'vocab.json', 'merges.txt', 'added_tokens.json', 'vocab.txt', 'spiece.model')


def copy_tokenizer_files(src: Path, dst: Path, extra: Sequence[str] = ()) -> list[str]:
    """Copies the tokenizer files found in `src` (and `extra` names) into `dst`; returns the names copied."""
    copied = []
    for name in (*TOKENIZER_FILES, *extra):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied
