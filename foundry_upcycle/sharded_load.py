"""Loading a plan of tensor jobs into a (possibly sharded) training model: rank 0 produces each tensor, every rank
receives it straight into its own (sharded) parameter, and it is freed before the next.

- Only rank 0 holds the jobs (it alone reads the source); it sends the schedule (output names per job, a small
  object) first, so every rank joins the same sequence of broadcasts.
- FSDP1 units are unsharded one at a time (`summon_full_params(recurse=False, writeback=True)`, as in a forward
  pass) and filled by the jobs whose outputs they hold; FSDP2 / DTensor parameters take their local shard of the
  broadcast tensor; plain parameters (DDP, one process) are written in place.
- Peak memory per rank: one tensor of the job being streamed (rank 0 also holds the dense tensor it was made from).
Imports torch and Composer's dist utilities.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Mapping, Optional, Sequence

import torch
from composer.utils import dist

from foundry_upcycle.jobs import Job, run_job


def from_rank0(obj):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def clean_name(name: str) -> str:
    """A module/parameter name without FSDP1 and activation-checkpoint wrapper segments."""
    from torch.distributed.fsdp._common_utils import clean_tensor_name
    return clean_tensor_name(name)


def model_keys(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """{state-dict key: shape} of an unwrapped model, one key per tensor (a tied head's second name dropped)."""
    seen, out = set(), {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            out[key] = tuple(tensor.shape)
    return out


def fsdp1_units(model: torch.nn.Module) -> list:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    return [m for m in FSDP.fsdp_modules(model) if m._handle is not None]


def _groups(model: torch.nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """{state-dict key: writable full-size tensor or DTensor} per group: each FSDP1 unit (unsharded while the
    caller works on it; writes land in every rank's shard when it reshards), then all other parameters/buffers."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    names = {id(m): clean_name(n) for n, m in model.named_modules()}
    units = fsdp1_units(model)
    for unit in units:
        flat = unit._handle.flat_param
        with FSDP.summon_full_params(unit, recurse=False, writeback=True):
            group = {}
            for info in flat._param_infos:
                prefix = names[id(info.module)]
                group[f'{prefix}.{info.param_name}' if prefix else info.param_name] = getattr(info.module,
                                                                                             info.param_name)
            yield group
    flat_params = {id(u._handle.flat_param) for u in units}
    rest = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if id(tensor) not in flat_params and '_flat_param' not in name:
            rest.setdefault(clean_name(name), tensor)
    yield rest


@torch.no_grad()
def load_jobs(model: torch.nn.Module, jobs: Optional[Sequence[Job]], expected: Mapping[str, tuple[int, ...]],
              broadcast: bool = True) -> set[str]:
    """Writes the jobs' tensors (named by model state-dict keys) into `model`; returns the keys written.

    jobs: on rank 0 the plan, elsewhere None. broadcast=False: rank 0 loads alone (its model is unwrapped, the
    others' are on meta and get the weights from Composer's delayed FSDP wrap)."""
    rank0 = dist.get_global_rank() == 0
    schedule = [[s.name for s in job.specs] for job in jobs] if rank0 else None
    if broadcast and dist.get_world_size() > 1:
        schedule = from_rank0(schedule)
    if schedule is None:
        return set()
    job_of = {key: i for i, keys in enumerate(schedule) for key in keys}
    loaded: set[str] = set()
    for group in _groups(model):
        for i in sorted({job_of[k] for k in group if k in job_of and k not in loaded}):
            keys = schedule[i]
            assert all(k in group for k in keys), f'job {keys[0]}: outputs span several FSDP units'
            stream = run_job(jobs[i]) if rank0 else None
            for key in keys:
                tensor = next(stream)[1] if stream is not None else None
                _write(group[key], tensor, tuple(expected[key]), broadcast)
                del tensor
                loaded.add(key)
    return loaded


def _write(dest: torch.Tensor, tensor: Optional[torch.Tensor], shape: tuple[int, ...], broadcast: bool) -> None:
    from torch.distributed.tensor import DTensor, distribute_tensor
    if isinstance(dest, DTensor):
        full = tensor.to(dest.device, dest.dtype) if tensor is not None else torch.empty(
            dest.shape, dtype=dest.dtype, device=dest.to_local().device)
        if broadcast:
            _broadcast(full)
        local = distribute_tensor(full, dest.device_mesh, dest.placements, src_data_rank=None).to_local()
        dest.to_local().copy_(local)
        return
    assert tuple(dest.shape) == shape, (tuple(dest.shape), shape)
    if tensor is not None:
        dest.copy_(tensor)
    if broadcast:
        _broadcast(dest)


def _broadcast(tensor: torch.Tensor) -> None:
    """In-place broadcast from rank 0 (NCCL needs CUDA tensors: CPU ones go through a device copy)."""
    if dist.get_world_size() == 1:
        return
    import torch.distributed as tdist
    if tdist.get_backend() == 'nccl' and not tensor.is_cuda:
        staged = tensor.cuda()
        tdist.broadcast(staged, src=0)
        tensor.copy_(staged.cpu())
    elif tensor.is_contiguous():
        tdist.broadcast(tensor, src=0)
    else:
        staged = tensor.contiguous()
        tdist.broadcast(staged, src=0)
        tensor.copy_(staged)


@contextlib.contextmanager
def full_param(model: torch.nn.Module, suffix: str) -> Iterator[torch.Tensor]:
    """The first parameter whose clean name ends with `suffix`, unsharded (one FSDP1 unit or one DTensor gather)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.tensor import DTensor
    names = {id(m): n for n, m in model.named_modules()}
    for unit in fsdp1_units(model):
        for info in unit._handle.flat_param._param_infos:
            if f'{clean_name(names[id(info.module)])}.{info.param_name}'.endswith(suffix):
                with FSDP.summon_full_params(unit, recurse=False, writeback=False):
                    yield getattr(info.module, info.param_name).detach().clone()
                return
    for name, param in model.named_parameters():
        if clean_name(name).endswith(suffix):
            yield param.full_tensor() if isinstance(param, DTensor) else param
            return
    raise AssertionError(f'no parameter ending in {suffix}')
