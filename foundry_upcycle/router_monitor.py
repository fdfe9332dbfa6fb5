"""Registered callback `upcycle_router_monitor`: router health of every MoE layer, through Composer's loggers.

Add it to any recipe with a `torch_dmoe` / `mb_dmoe` model (every variant of the upcycle block: fine-grained E*G
experts, MoE on some blocks only (logged under their block index), grown, Drop-Upcycling) or a transformers Mixtral
(`hf_upcycle_causal_lm`: each layer's `block_sparse_moe`, router `gate`, experts `experts[e].{w1, w3, w2}`):

    callbacks:
      upcycle_router_monitor: {interval: 10}

For batches 0, interval, 2*interval, ... and the last batch of the run it logs, at the step of that batch
(the step Composer logs `loss/train/*` at), per MoE layer i (0-based block index):
  router/layer{i}/load/expert{e}  fraction of the batch's (token, top-k slot) assignments routed to expert e
  router/layer{i}/entropy         mean per-token entropy (nats) of the router softmax
  router/layer{i}/expert_spread   mean over experts of ||W_e - mean_e W|| / ||mean_e W||, W_e = expert e's w1, v1, w2
                                  (fine-grained experts: the mean over the experts holding the same dense shard)
  router/layer{i}/lbl             the layer's unweighted load-balancing loss (megablocks scaling; 1.0 = uniform)
  router/lbl                      mean of the layers' lbl

Routing statistics come from forward hooks on each router's linear layer, armed only between Composer's
BEFORE_FORWARD and AFTER_FORWARD, so activation-checkpointing recomputes (in backward) and eval are not counted.
They are summed over microbatches and all-reduced over ranks (one small all-reduce per logged batch): the values
describe the whole global batch. The spread is computed in a forward hook of each MoE layer on logged batches,
while FSDP has the layer's parameters unsharded anyway (no extra all-gather); with expert parallelism each rank
holds E/W experts and the mean expert is one all-reduce. Everything runs under `no_grad` on detached tensors.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Optional

import torch
from composer.core import Callback, State, TimeUnit
from composer.loggers import Logger
from composer.utils import dist

from foundry_upcycle.router_stats import EXPERT_TENSORS, expert_spread_sums, routing_metrics, routing_sums

log = logging.getLogger(__name__)

# FSDP / activation-checkpoint wrappers insert `_fsdp_wrapped_module.` etc. between the block index and `ffn`.
_MOE_LAYER = re.compile(r'(?:^|\.)blocks\.(?P<layer>\d+)\.(?:.*\.)?ffn$')
_MIXTRAL_LAYER = re.compile(r'(?:^|\.)layers\.(?P<layer>\d+)\.(?:.*\.)?block_sparse_moe$')
_MIXTRAL_TENSORS = ('w1', 'w3', 'w2')   # gate, up, down of each transformers Mixtral expert


def moe_layers(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """{block index: MoE FFN module} of an MPT model (with .router.layer and .experts.mlp) or a transformers Mixtral
    (with .gate and .experts), wrappers or not."""
    out = {}
    for name, module in model.named_modules():
        m = _MOE_LAYER.search(name)
        if m and hasattr(module, 'router') and hasattr(module, 'experts'):
            out.setdefault(int(m['layer']), module)
        m = _MIXTRAL_LAYER.search(name)
        if m and hasattr(module, 'gate') and hasattr(module, 'experts'):
            out.setdefault(int(m['layer']), module)
    return out


def _router_linear(ffn: torch.nn.Module) -> torch.nn.Module:
    """The linear layer whose output is the router logits [T, E]."""
    return ffn.gate if hasattr(ffn, 'gate') else ffn.router.layer


class RouterMonitor(Callback):

    def __init__(self, interval: int = 10):
        if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
            raise ValueError(f'callbacks.upcycle_router_monitor.interval: must be an integer >= 1, got {interval!r}')
        self.interval = interval
        self._handles: list[Any] = []
        self._top_k = 0
        self._num_experts = 0
        self._armed = False          # routing statistics are recorded (training forward only)
        self._measure_spread = False  # this batch is logged: measure the expert spread in forward
        self._sums: dict[int, torch.Tensor] = {}
        self._spread: dict[int, torch.Tensor] = {}
        self._batch = -1
        self._last_logged = -1

    # -- hooks -------------------------------------------------------------------------------------------
    def fit_start(self, state: State, logger: Logger) -> None:
        layers = moe_layers(state.model)
        if not layers:
            raise ValueError('callbacks.upcycle_router_monitor: the model has no MoE layers (torch_dmoe / mb_dmoe, or '
                             'a transformers Mixtral)')
        self._top_k, self._num_experts = _routing_shape(state.model)
        self._layout = _shard_layout(state.model)
        for i, ffn in layers.items():
            self._handles.append(_router_linear(ffn).register_forward_hook(self._router_hook(i)))
            self._handles.append(ffn.register_forward_hook(self._spread_hook(i)))
        log.info('upcycle_router_monitor: %d MoE layers, logging every %d batches', len(layers), self.interval)

    def batch_start(self, state: State, logger: Logger) -> None:
        self._sums.clear()
        self._spread.clear()
        self._batch = int(state.timestamp.batch)  # 0-based index of this batch, the step of loss/train/*
        self._measure_spread = self._batch % self.interval == 0 or _is_last_batch(state, self._batch)

    def before_forward(self, state: State, logger: Logger) -> None:
        self._armed = True

    def after_forward(self, state: State, logger: Logger) -> None:
        self._armed = False

    def batch_end(self, state: State, logger: Logger) -> None:
        if self._measure_spread:
            self._log(state, logger)

    def fit_end(self, state: State, logger: Logger) -> None:
        if self._sums and self._last_logged != self._batch:
            self._log(state, logger)  # a run whose length is not in batches: its last batch (no spread)

    def close(self, state: State, logger: Logger) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # -- measurement ---------------------------------------------------------------------------------------
    def _router_hook(self, layer: int):

        def hook(module: torch.nn.Module, inputs: Any, logits: torch.Tensor) -> None:
            if not (self._armed and module.training):
                return
            with torch.no_grad():
                sums = routing_sums(logits, self._top_k)
            self._sums[layer] = sums if layer not in self._sums else self._sums[layer] + sums

        return hook

    def _spread_hook(self, layer: int):

        def hook(module: torch.nn.Module, inputs: Any, output: Any) -> None:
            if not (self._armed and self._measure_spread and module.training) or layer in self._spread:
                return
            with torch.no_grad():
                self._spread[layer] = (_mixtral_spread(module.experts, *self._layout) if hasattr(module, 'gate') else
                                       _layer_spread(module.experts.mlp, self._num_experts, *self._layout))

        return hook

    def _log(self, state: State, logger: Logger) -> None:
        layers = sorted(self._sums)
        assert layers, 'no router calls were recorded in this batch'
        stacked = torch.stack([self._sums[i] for i in layers])  # [L, 2E+2]
        if dist.get_world_size() > 1:
            dist.all_reduce(stacked, reduce_operation='SUM')
        metrics: dict[str, float] = {}
        lbls = []
        for i, sums in zip(layers, stacked):
            m = routing_metrics(sums, self._top_k)
            for e, frac in enumerate(m['load'].tolist()):
                metrics[f'router/layer{i}/load/expert{e}'] = frac
            metrics[f'router/layer{i}/entropy'] = m['entropy'].item()
            metrics[f'router/layer{i}/lbl'] = m['lbl'].item()
            lbls.append(metrics[f'router/layer{i}/lbl'])
            if i in self._spread:
                metrics[f'router/layer{i}/expert_spread'] = self._spread[i].item()
        metrics['router/lbl'] = sum(lbls) / len(lbls)
        logger.log_metrics(metrics, step=self._batch)
        self._last_logged = self._batch


def _layer_spread(mlp: torch.nn.Module, num_experts: int, granularity: int = 1, grow: int = 1) -> torch.Tensor:
    """Expert spread of one MoE layer from its (unsharded, in forward) expert tensors."""
    tensors, group, local = {}, None, num_experts
    for name in EXPERT_TENSORS:
        w = getattr(mlp, name, None)
        if w is None:
            continue
        if hasattr(w, 'to_local'):  # DTensor: expert parallelism shards dim 0 (experts) over the mesh
            group = w.device_mesh.get_group()
            local = num_experts // w.device_mesh.size()
            w = w.to_local()
        tensors[name] = w
    dist2, norm2 = expert_spread_sums(tensors, local, num_experts, group, granularity, grow)
    ratio_sum = (dist2.sqrt() / norm2.sqrt()).sum()
    if group is not None:
        torch.distributed.all_reduce(ratio_sum, group=group)
    return ratio_sum / num_experts


def _mixtral_spread(experts: torch.nn.ModuleList, granularity: int = 1, grow: int = 1) -> torch.Tensor:
    """Expert spread of one transformers Mixtral layer: its experts' w1, w3, w2 stacked to [E, ...] (every expert
    is on every rank: FSDP has the layer unsharded in its forward)."""
    n = len(experts)
    tensors = {name: torch.stack([getattr(e, name).weight for e in experts]) for name in _MIXTRAL_TENSORS}
    dist2, norm2 = expert_spread_sums(tensors, n, n, None, granularity, grow)
    return (dist2.sqrt() / norm2.sqrt()).sum() / n


def _mpt_config(model: torch.nn.Module) -> Any:
    model = getattr(model, 'module', model)  # DistributedDataParallel
    return getattr(getattr(model, 'model', model), 'config', None)


def _shard_layout(model: torch.nn.Module) -> tuple[int, int]:
    """(granularity, grow) of fine-grained experts (mpt_upcycle_causal_lm's `expert_granularity` / `expert_grow`;
    hf_upcycle_causal_lm's `expert_layout`)."""
    layout = getattr(getattr(model, 'module', model), 'expert_layout', None)
    if layout is not None:
        return int(layout[0]), int(layout[1])
    config = _mpt_config(model)
    return int(getattr(config, 'expert_granularity', None) or 1), int(getattr(config, 'expert_grow', None) or 1)


def _routing_shape(model: torch.nn.Module) -> tuple[int, int]:
    """(top_k, number of experts) from the model's config: MPT's ffn_config or a Mixtral config."""
    config = _mpt_config(model)
    if getattr(config, 'model_type', None) == 'mixtral':
        return int(config.num_experts_per_tok), int(config.num_local_experts)
    ffn_config = getattr(config, 'ffn_config', None)
    if not ffn_config or 'moe_top_k' not in ffn_config:
        raise ValueError('callbacks.upcycle_router_monitor: model.ffn_config has no moe_top_k (not an MPT MoE or a '
                         'Mixtral)')
    return int(ffn_config['moe_top_k']), int(ffn_config['moe_num_experts'])


def _is_last_batch(state: State, index: int) -> bool:
    max_duration: Optional[Any] = state.max_duration
    return max_duration is not None and max_duration.unit == TimeUnit.BATCH and index + 1 >= max_duration.value
