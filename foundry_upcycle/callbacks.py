"""Registered callback `upcycle_loader`: loads the dense checkpoint into the MoE model at BEFORE_LOAD.

Runs inside Composer's Trainer after FSDP wrapping and before autoresume, and loads through
`State.load_model_state` (torch's `set_model_state_dict`), so FSDP keeps working and an autoresume
checkpoint of the run itself, loaded afterwards, wins over the fresh copies.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch
from composer.core import Callback, State
from composer.loggers import Logger

from foundry_upcycle.checkpoint_io import load_state_dict
from foundry_upcycle.upcycle import check_shapes, expert_spread, upcycle_state_dict

log = logging.getLogger(__name__)


class UpcycleLoader(Callback):

    def __init__(self, source: str, num_experts: int, router_init_std: float = 0.02, seed: int = 0,
                 expert_noise_std: float = 0.0, expert_output_scale: float = 1.0):
        self.source = source
        self.num_experts = num_experts
        self.router_init_std = router_init_std
        self.seed = seed
        self.expert_noise_std = expert_noise_std
        self.expert_output_scale = expert_output_scale
        self.fresh_after_load: bool | None = None  # set at AFTER_LOAD: True = fresh copies, False = resumed/trained

    def before_load(self, state: State, logger: Logger) -> None:
        moe = upcycle_state_dict(self._dense_state_dict(state), self.num_experts, self.router_init_std, self.seed,
                                 self.expert_noise_std, self.expert_output_scale)
        if not state.fsdp_enabled:  # under FSDP, torch's strict load reports mismatches instead
            expected = {k: v.shape for k, v in state.model.state_dict().items()}
            check_shapes(moe, expected, f'upcycle.from={self.source}')
        state.load_model_state({'model': moe}, logger, strict=True)
        log.info('upcycle: loaded %s into %d experts per block', self.source, self.num_experts)

    def after_load(self, state: State, logger: Logger) -> None:
        if state.fsdp_enabled:
            return
        w1 = next(p for n, p in state.model.named_parameters() if n.endswith('ffn.experts.mlp.w1'))
        spread = expert_spread(w1, self.num_experts)
        self.fresh_after_load = spread == 0.0
        what = 'identical copies of the dense FFN' if self.fresh_after_load else 'distinct (trained weights)'
        log.info('upcycle: after load at batch %d, experts are %s (max expert spread %.3g)',
                 int(state.timestamp.batch), what, spread)
        logger.log_hyperparameters({'upcycle/fresh_experts_after_load': self.fresh_after_load})

    def _dense_state_dict(self, state: State) -> dict[str, torch.Tensor]:
        if '://' in self.source:
            from composer.utils import get_file
            with tempfile.TemporaryDirectory() as tmp:
                local = str(Path(tmp) / Path(self.source).name)
                get_file(self.source, local)
                dense = load_state_dict(local, 'upcycle.from')
        else:
            dense = load_state_dict(self.source, 'upcycle.from')
        return _match_prefix(dense, next(iter(state.model.state_dict())))


def _match_prefix(dense: dict[str, torch.Tensor], model_key: str) -> dict[str, torch.Tensor]:
    """Adds Composer's `model.` prefix to a bare HF/MPT state dict (e.g. safetensors of MPTForCausalLM)."""
    if model_key.startswith('model.') and not any(k.startswith('model.') for k in dense):
        return {f'model.{k}': v for k, v in dense.items()}
    return dense
