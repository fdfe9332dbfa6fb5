"""Registered callback `upcycle_loader`: loads the dense checkpoint into the MoE model at BEFORE_LOAD.

Runs inside Composer's Trainer after FSDP wrapping and before autoresume:
- With an autoresume checkpoint of the run itself in `save_folder` (found the way Composer looks for it), it does
  nothing: Composer loads that checkpoint next, and reading the dense one would only cost memory.
- Otherwise rank 0 alone reads the dense checkpoint (weights only, memory-mapped) and builds the MoE tensors; they
  reach the other ranks one tensor at a time, straight into each rank's (sharded) parameters. No rank gathers the
  model to read names (names and shapes are recorded at INIT, before wrapping), and no rank but 0 holds more than one
  full tensor at a time. FSDP1 units are unsharded one at a time (as in a forward pass), FSDP2/DTensor parameters
  take their local shard.
- Under `init_device: mixed` (FSDP wrap delayed until after loading) rank 0 loads into its unwrapped model and
  Composer's wrap broadcasts it (`sync_module_states`); the callback never wraps, so an autoresume load cannot wrap twice.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterator, Mapping, Optional

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from foundry_upcycle.checkpoint_io import load_state_dict
from foundry_upcycle.upcycle import check_shapes, expert_spread, upcycle_state_dict

log = logging.getLogger(__name__)

SOURCE_KEYS = 'upcycle.from (or the recipe\'s load_path)'


class UpcycleLoader(Callback):

    def __init__(self, source: str, num_experts: int, router_init_std: float = 0.02, seed: int = 0,
                 expert_noise_std: float = 0.0, expert_output_scale: float = 1.0, autoresume: bool = False):
        self.source = source
        self.num_experts = num_experts
        self.router_init_std = router_init_std
        self.seed = seed
        self.expert_noise_std = expert_noise_std
        self.expert_output_scale = expert_output_scale
        self.autoresume = autoresume
        self.fresh_after_load: bool | None = None  # set at AFTER_LOAD: True = fresh copies, False = resumed/trained
        self.report: dict = {}  # what BEFORE_LOAD did, for logs and tests
        self._expected: Optional[dict[str, tuple[int, ...]]] = None

    def init(self, state: State, logger: Logger) -> None:
        # Before any wrapping: the model's state-dict names and shapes (meta tensors are fine), read without gathering.
        self._expected = {k: tuple(v.shape) for k, v in state.model.state_dict().items()}

    def before_load(self, state: State, logger: Logger) -> None:
        assert self._expected is not None, 'Event.INIT did not reach the upcycle_loader callback'
        resume = self._autoresume_checkpoint(state)
        if resume is not None:
            self.report = {'action': 'skipped', 'autoresume_checkpoint': resume}
            log.info('upcycle: autoresume checkpoint %s found; skipping the dense load (Composer loads the run\'s own '
                     'checkpoint next)', resume)
            return
        moe, error = None, None
        if dist.get_global_rank() == 0:
            try:
                moe = self._moe_state_dict()
            except ValueError as e:
                error = str(e)
        error = _from_rank0(error)
        if error is not None:
            raise ValueError(error)
        delayed_wrap = state.load_monolith_rank0_only and not state.fsdp_enabled  # init_device: mixed
        if delayed_wrap:
            if moe is not None:  # rank 0; the others are on meta and receive the weights when Composer wraps
                state.model.load_state_dict(moe, strict=True)
        else:
            loaded = _broadcast_into(state.model, moe, self._expected)
            assert loaded == set(self._expected), sorted(set(self._expected) ^ loaded)[:5]
        self.report = {'action': 'upcycled', 'delayed_wrap': delayed_wrap}
        log.info('upcycle: loaded %s into %d experts per block', self.source, self.num_experts)

    def after_load(self, state: State, logger: Logger) -> None:
        with _full_param(state.model, 'ffn.experts.mlp.w1') as w1:
            spread = expert_spread(w1, self.num_experts)
        self.fresh_after_load = spread == 0.0
        self.report['fresh_after_load'] = self.fresh_after_load
        what = 'identical copies of the dense FFN' if self.fresh_after_load else 'distinct (trained weights)'
        log.info('upcycle: after load at batch %d, experts are %s (max expert spread %.3g)',
                 int(state.timestamp.batch), what, spread)
        logger.log_hyperparameters({'upcycle/fresh_experts_after_load': self.fresh_after_load})

    def _moe_state_dict(self) -> dict[str, torch.Tensor]:
        """Rank 0: the dense checkpoint, upcycled and checked against the model. ValueErrors name the file."""
        assert self._expected is not None
        dense = _match_prefix(self._read_dense(), next(iter(self._expected)))
        try:
            moe = upcycle_state_dict(dense, self.num_experts, self.router_init_std, self.seed, self.expert_noise_std,
                                     self.expert_output_scale)
        except ValueError as e:
            raise ValueError(f'{SOURCE_KEYS} {self.source}: {e}') from None
        check_shapes(moe, self._expected, f'{SOURCE_KEYS} {self.source}')
        return moe

    def _read_dense(self) -> dict[str, torch.Tensor]:
        if '://' not in self.source:
            return load_state_dict(self.source, SOURCE_KEYS, mmap=True)
        from composer.utils import get_file
        with tempfile.TemporaryDirectory() as tmp:
            local = str(Path(tmp) / Path(self.source).name)
            get_file(self.source, local)
            # Not mmapped: the temporary file goes away when this block ends.
            return load_state_dict(local, f'{SOURCE_KEYS} {self.source}')

    def _autoresume_checkpoint(self, state: State) -> Optional[str]:
        """The checkpoint Composer's autoresume will load next, as rank 0 sees it (same rule as the Trainer: the
        save folder's `latest` file of rank 0). Remote-only checkpoints are not looked up: then the dense load runs
        and the autoresume load still wins."""
        if not self.autoresume:
            return None
        from composer.callbacks import CheckpointSaver
        from composer.utils import format_name_with_dist
        saver = next((c for c in state.callbacks if isinstance(c, CheckpointSaver)), None)
        path = None
        if dist.get_global_rank() == 0 and saver is not None and saver.latest_filename is not None:
            folder = format_name_with_dist(saver.folder, state.run_name)
            latest = os.path.join(folder, format_name_with_dist(saver.latest_filename.filename, state.run_name))
            path = os.path.abspath(latest) if os.path.exists(latest) else None
        return _from_rank0(path)


def _from_rank0(obj):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _match_prefix(dense: dict[str, torch.Tensor], model_key: str) -> dict[str, torch.Tensor]:
    """Adds Composer's `model.` prefix to a bare HF/MPT state dict (e.g. safetensors of MPTForCausalLM)."""
    if model_key.startswith('model.') and not any(k.startswith('model.') for k in dense):
        return {f'model.{k}': v for k, v in dense.items()}
    return dense


def _clean(name: str) -> str:
    """A module/parameter name without FSDP1 and activation-checkpoint wrapper segments."""
    from torch.distributed.fsdp._common_utils import clean_tensor_name
    return clean_tensor_name(name)


def _fsdp1_units(model: torch.nn.Module) -> list:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    return [m for m in FSDP.fsdp_modules(model) if m._handle is not None]


def _destinations(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(state-dict key, writable full-size tensor or DTensor) for every parameter and buffer of `model`.

    FSDP1 units are unsharded one at a time (`summon_full_params(recurse=False, writeback=True)`), so a write into
    the yielded view lands in every rank's shard when the unit reshards."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    names = {id(m): _clean(n) for n, m in model.named_modules()}
    seen: set[int] = set()
    for unit in _fsdp1_units(model):
        flat = unit._handle.flat_param
        with FSDP.summon_full_params(unit, recurse=False, writeback=True):
            for info in flat._param_infos:
                prefix = names[id(info.module)]
                tensor = getattr(info.module, info.param_name)
                yield f'{prefix}.{info.param_name}' if prefix else info.param_name, tensor
        seen.update(id(info.module) for info in flat._param_infos)
    flat_params = {id(u._handle.flat_param) for u in _fsdp1_units(model)}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if id(tensor) not in flat_params and '_flat_param' not in name:
            yield _clean(name), tensor


@torch.no_grad()
def _broadcast_into(model: torch.nn.Module, moe: Optional[Mapping[str, torch.Tensor]],
                    expected: Mapping[str, tuple[int, ...]]) -> set[str]:
    """Copies rank 0's `moe` tensors into `model` on every rank; returns the keys written."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    rank0 = dist.get_global_rank() == 0
    loaded = set()
    for key, dest in _destinations(model):
        if key not in expected or key in loaded:
            continue  # non-persistent buffers; shared (tied) parameters
        if isinstance(dest, DTensor):
            full = moe[key].to(dest.device, dest.dtype) if rank0 else torch.empty(
                dest.shape, dtype=dest.dtype, device=dest.to_local().device)
            _broadcast(full)
            local = distribute_tensor(full, dest.device_mesh, dest.placements, src_data_rank=None).to_local()
            dest.to_local().copy_(local)
        else:
            assert tuple(dest.shape) == tuple(expected[key]), (key, tuple(dest.shape), expected[key])
            if rank0:
                dest.copy_(moe[key])
            _broadcast(dest)
        loaded.add(key)
    return loaded


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
def _full_param(model: torch.nn.Module, suffix: str) -> Iterator[torch.Tensor]:
    """The first parameter whose clean name ends with `suffix`, unsharded (one FSDP1 unit or one DTensor gather)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.tensor import DTensor
    for unit in _fsdp1_units(model):
        for info in unit._handle.flat_param._param_infos:
            if f'{_clean(_module_name(model, info.module))}.{info.param_name}'.endswith(suffix):
                with FSDP.summon_full_params(unit, recurse=False, writeback=False):
                    yield getattr(info.module, info.param_name).detach().clone()
                return
    for name, param in model.named_parameters():
        if _clean(name).endswith(suffix):
            yield param.full_tensor() if isinstance(param, DTensor) else param
            return
    raise AssertionError(f'no parameter ending in {suffix}')


def _module_name(model: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)
