"""`hf_moe_checkpointer`: a Composer callback that writes Hugging Face checkpoints of an MPT model as it trains.

YAML (under `callbacks:`):
    hf_moe_checkpointer:
      save_folder: ./{run_name}/hf        # local path; {run_name} is filled in
      save_interval: 100ba                # or an int (batches), or any Composer time string (e.g. 1ep)
      target: auto                        # auto | llama | mistral | mixtral | dbrx
      tokenizer: /path/to/tokenizer_dir   # optional, copied into every export
      dtype: bf16                         # optional; default keeps the training dtype
At each interval and at the end of fit it writes `<save_folder>/ba<N>/` atomically. Only rank 0 reads the
weights: without FSDP it streams them from its own replica one tensor at a time (no state-dict copy, the other
ranks do nothing); under FSDP every rank joins the gather, which keeps the full state dict on rank 0's CPU
only. The target is checked at INIT, so a recipe the target cannot represent fails before training starts.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Union

from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import create_interval_scheduler, dist

from foundry_upcycle.export.hf_export import check_target, engine_support, export_state_dict, mpt_config_dict
from foundry_upcycle.export.targets import TARGETS, parse_dtype

log = logging.getLogger(__name__)

__all__ = ['HFExportCheckpointer']


def _unwrap(model: Any) -> Any:
    from torch.nn.parallel import DistributedDataParallel
    return model.module if isinstance(model, DistributedDataParallel) else model


def _mpt_config(state: State) -> dict[str, Any]:
    inner = getattr(_unwrap(state.model), 'model', None)
    config = getattr(inner, 'config', None)
    if config is None or getattr(config, 'model_type', None) != 'mpt':
        raise ValueError(f'hf_moe_checkpointer: needs an MPT model (mpt_causal_lm / mpt_upcycle_causal_lm), '
                         f'got {type(_unwrap(state.model)).__name__}')
    cfg = mpt_config_dict(config)
    lbl = getattr(_unwrap(state.model), 'load_balancing_loss_weight', None)  # mpt_upcycle_causal_lm
    if lbl:
        cfg['load_balancing_loss_weight'] = lbl
    return cfg


class HFExportCheckpointer(Callback):
    """Exports the model to `<save_folder>/ba<N>/` as an HF Llama / Mistral / Mixtral / DBRX directory."""

    def __init__(self, save_folder: str, save_interval: Union[str, int], target: str = 'auto',
                 tokenizer: Optional[str] = None, dtype: Optional[str] = None, overwrite: bool = True):
        if '://' in str(save_folder):
            raise ValueError(f'hf_moe_checkpointer.save_folder: {save_folder} is remote; only local paths are written')
        if target not in TARGETS:
            raise ValueError(f'hf_moe_checkpointer.target: must be one of {TARGETS}, got {target!r}')
        if tokenizer is not None and not Path(tokenizer).expanduser().is_dir():
            raise ValueError(f'hf_moe_checkpointer.tokenizer: {tokenizer} is not a directory')
        if isinstance(save_interval, bool) or not isinstance(save_interval, (int, str)):
            raise ValueError(f'hf_moe_checkpointer.save_interval: expected e.g. 100ba or an int, got {save_interval!r}')
        if isinstance(save_interval, int):
            if save_interval < 1:
                raise ValueError(f'hf_moe_checkpointer.save_interval: must be >= 1 batch, got {save_interval}')
            save_interval = f'{save_interval}ba'
        try:
            self._due = create_interval_scheduler(save_interval, include_end_of_training=True)
        except (ValueError, NotImplementedError) as e:
            raise ValueError(f'hf_moe_checkpointer.save_interval: {save_interval!r} is not a Composer interval '
                             f'({e})') from None
        self.save_folder = str(save_folder)
        self.target = target
        self.tokenizer = tokenizer
        self.dtype = parse_dtype(dtype)
        self.overwrite = overwrite
        self.resolved_target: Optional[str] = None
        self.exported: list[Path] = []
        self._last_batch = -1

    def init(self, state: State, logger: Logger) -> None:
        self.resolved_target, arch = check_target(_mpt_config(state), self.target)
        engine_support(arch, self.resolved_target)
        log.info('hf_moe_checkpointer: will export %s checkpoints to %s', self.resolved_target, self.save_folder)

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            self.init(state, logger)
        elif event in (Event.BATCH_CHECKPOINT, Event.EPOCH_CHECKPOINT) and self._due(state, event):
            self._export(state)
        elif event == Event.FIT_END:
            self._export(state)

    def _export(self, state: State) -> None:
        batch = int(state.timestamp.batch)
        if batch == self._last_batch:
            return
        self._last_batch = batch
        if state.fsdp_enabled:  # a collective: every rank joins, rank 0 alone receives the tensors
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            state_dict = get_model_state_dict(state.model, options=StateDictOptions(full_state_dict=True,
                                                                                     cpu_offload=True))
        elif dist.get_global_rank() == 0:
            state_dict = _unwrap(state.model).state_dict()  # views of the live weights; copied one at a time
        if dist.get_global_rank() == 0:
            out = Path(self.save_folder.format(run_name=state.run_name)) / f'ba{batch}'
            export_state_dict(state_dict, _mpt_config(state), out, target=self.resolved_target or self.target,
                              tokenizer=self.tokenizer, overwrite=self.overwrite, dtype=self.dtype, progress=False)
            self.exported.append(out)
            log.info('hf_moe_checkpointer: wrote %s', out)
