"""Plans of tensor jobs: what the mappings produce and what the disk writer and the in-training loader consume.

A mapping (e.g. dense MPT -> MPT MoE, Llama -> Mixtral) is a list of `Job`s: each names its output tensors up front
(`TensorSpec`: name, shape, dtype) and produces them on demand, reading its source tensors only then. `produce()`
may be a generator, so a job that makes E expert copies of one dense matrix holds the dense matrix and one copy
at a time. A consumer runs one job at a time through `run_job`, which checks every tensor against its spec.
A tensor source is anything with `specs` ({name: TensorSpec}) and `read(name)`; `MemorySource` wraps tensors that
are already in memory (see `reader.py` for files). Imports only torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping

import torch

SAFETENSORS_DTYPES = {
    torch.float32: 'F32', torch.float16: 'F16', torch.bfloat16: 'BF16', torch.float64: 'F64',
    torch.int64: 'I64', torch.int32: 'I32', torch.int16: 'I16', torch.int8: 'I8', torch.uint8: 'U8',
    torch.bool: 'BOOL',
}
TORCH_DTYPES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class Job:
    """One unit of work: `produce()` returns (or yields) the tensors described by `specs`, in that order."""
    specs: tuple[TensorSpec, ...]
    produce: Callable[[], Iterable[torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.specs)


def run_job(job: Job) -> Iterator[tuple[TensorSpec, torch.Tensor]]:
    """(spec, tensor) pairs of one job, one at a time, each checked against its spec."""
    produced = iter(job.produce())
    for n, spec in enumerate(job.specs):
        tensor = next(produced, None)
        if tensor is None:
            raise RuntimeError(f'job for {job.specs[0].name} produced {n} tensors, planned {len(job.specs)}')
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise RuntimeError(f'{spec.name}: produced {tuple(tensor.shape)} {tensor.dtype}, '
                               f'planned {spec.shape} {spec.dtype}')
        yield spec, tensor
        del tensor
    if next(produced, None) is not None:
        raise RuntimeError(f'job for {job.specs[0].name} produced more tensors than the {len(job.specs)} planned')


def run_jobs(jobs: Iterable[Job]) -> dict[str, torch.Tensor]:
    """Every job's tensors in one dict (for tests and small models; defeats the streaming)."""
    return {spec.name: tensor for job in jobs for spec, tensor in run_job(job)}


class MemorySource:
    """Tensors already in memory (a live model's state dict, a memory-mapped checkpoint): nothing is copied."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self._tensors = tensors
        self.specs = {k: TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()}

    def read(self, name: str) -> torch.Tensor:
        return self._tensors[name].detach()


def in_memory_jobs(tensors: Mapping[str, torch.Tensor]) -> list[Job]:
    """One job per tensor already in memory."""
    return [Job((TensorSpec(k, tuple(v.shape), v.dtype),), (lambda v=v: [v])) for k, v in tensors.items()]
