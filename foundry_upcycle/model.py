"""Registered model `mpt_upcycle_causal_lm`: foundry's MPT plus router losses for `torch_dmoe`, and an MoE on
some blocks only (`moe_layers` + `dense_ffn_config`, which foundry's `block_overrides` cannot express).

Foundry adds megablocks' load-balancing loss for `mb_dmoe` but none for `torch_dmoe`. This class records
every router's logits with forward hooks and adds the load-balancing loss (and an optional z-loss).
The loss is a dict, so Composer logs the language loss and each auxiliary term apart:
`loss/train/loss`, `loss/train/lbl`, `loss/train/router_zloss`, `loss/train/total`.

Activation checkpointing: logits are recorded only while `forward` runs, so the recompute in backward is ignored.
Non-reentrant checkpointing keeps the recorded logits attached to the graph (their backward recomputes the block);
reentrant checkpointing runs the forward under `no_grad`, so the router losses would silently get no gradient:
`loss` raises then (the upcycle block sets `fsdp_config.activation_checkpointing_reentrant: false`).
"""
from __future__ import annotations

import copy
from typing import Any, Mapping, MutableMapping, Union

import torch
from llmfoundry.models.mpt import ComposerMPTCausalLM, MPTForCausalLM, MPTModel

from foundry_upcycle.losses import load_balancing_loss, router_z_loss

ROUTER_SUFFIX = 'ffn.router.layer'
MEGABLOCKS_FFNS = ('mb_dmoe', 'mb_moe')


class UpcycleMPTModel(MPTModel):
    """MPT whose blocks listed in `config.moe_layers` get `ffn_config` (the MoE) and the others `dense_ffn_config`.

    Foundry 0.22's `block_overrides` allows attention keys only (`MPTConfig.allowed_block_overrides`), so the
    per-block FFN is built here. Without `moe_layers` this is foundry's MPTModel unchanged."""

    def construct_blocks(self, config) -> torch.nn.ModuleList:
        moe_layers = getattr(config, 'moe_layers', None)
        if moe_layers is None:
            return super().construct_blocks(config)
        dense_ffn = getattr(config, 'dense_ffn_config', None)
        if not isinstance(dense_ffn, dict) or dense_ffn.get('ffn_type') not in ('mptglu', 'mptmlp'):
            raise ValueError(f'model.dense_ffn_config must be the dense FFN (mptglu / mptmlp) of the blocks outside '
                             f'model.moe_layers, got {dense_ffn!r}')
        bad = sorted(set(moe_layers) - set(range(config.n_layers)))
        if bad or not moe_layers:
            raise ValueError(f'model.moe_layers {list(moe_layers)}: blocks {bad} do not exist (n_layers '
                             f'{config.n_layers})')
        if config.block_overrides is not None:
            raise ValueError('model.moe_layers cannot be combined with model.block_overrides')
        block_args = self.extract_block_args(config.to_dict())
        if getattr(self, 'mb_args', None) is not None:
            self.mb_args.num_layers = len(moe_layers)   # megablocks' LBL expects one entry per MoE layer
        self.state_cache_layers = {'reuse_kv_layer_idx': set(), 'reuse_kv_x_layer_idx': set()}  # as foundry's
        self.blocks_fuse_norm_attn_norm = block_args.get('fuse_norm_attn_norm', False)
        dense_args = {**block_args, 'ffn_config': copy.deepcopy(dense_ffn)}
        return torch.nn.ModuleList([
            self.block_class(device=config.init_device, **(block_args if i in moe_layers else dense_args))
            for i in range(config.n_layers)
        ])


class UpcycleMPTForCausalLM(MPTForCausalLM):

    @property
    def backbone_model_class(self) -> type[MPTModel]:
        return UpcycleMPTModel


class ComposerMPTUpcycleCausalLM(ComposerMPTCausalLM):

    def __init__(self, *args: Any, load_balancing_loss_weight: float = 0.0, router_zloss_weight: float = 0.0,
                 **kwargs: Any):
        ffn_config = kwargs.get('ffn_config') or {}
        if ffn_config.get('ffn_type') in MEGABLOCKS_FFNS and load_balancing_loss_weight and \
                ffn_config.get('moe_loss_weight', 0.1):  # megablocks' own default moe_loss_weight is 0.1
            raise ValueError(
                f'model.load_balancing_loss_weight={load_balancing_loss_weight} with ffn_type '
                f'{ffn_config["ffn_type"]!r}: foundry already adds megablocks\' load-balancing loss '
                '(model.ffn_config.moe_loss_weight), so it would count twice; set one of them to 0',
            )
        super().__init__(*args, **kwargs)
        self.load_balancing_loss_weight = float(load_balancing_loss_weight)
        self.router_zloss_weight = float(router_zloss_weight)
        self._router_logits: list[torch.Tensor] = []
        self._in_forward = False
        routers = [m for name, m in self.model.named_modules() if name.endswith(ROUTER_SUFFIX)]
        if not routers:
            raise ValueError('mpt_upcycle_causal_lm: model.ffn_config has no MoE router (expected torch_dmoe/mb_dmoe)')
        self._num_routers = len(routers)
        _check_same_ffn_type_on_all_ranks(self.config.ffn_config['ffn_type'])
        for router in routers:
            router.register_forward_hook(self._record_logits)

    @property
    def model_class(self) -> type[MPTForCausalLM]:
        return UpcycleMPTForCausalLM

    def _record_logits(self, module: torch.nn.Module, inputs: Any, logits: torch.Tensor) -> None:
        if self.training and self._in_forward:  # not the activation-checkpoint recompute in backward
            self._router_logits.append(logits)

    def forward(self, batch: MutableMapping):
        self._router_logits.clear()
        self._in_forward = True
        try:
            return super().forward(batch)
        finally:
            self._in_forward = False

    def loss(self, outputs: Any, batch: Mapping) -> Union[dict, torch.Tensor]:
        base = super().loss(outputs, batch)
        losses = dict(base) if isinstance(base, dict) else {'total': base, 'loss': base}
        # megablocks returns a Python 0.0 for its LBL when moe_loss_weight is 0; Composer calls .detach() on each
        ref = losses['loss']
        losses = {k: v if isinstance(v, torch.Tensor) else ref.new_tensor(float(v)) for k, v in losses.items()}
        if self.training and torch.is_grad_enabled():
            self._check_recorded_logits()
        if self._router_logits and self.load_balancing_loss_weight > 0:
            top_k = self.config.ffn_config['moe_top_k']
            losses['lbl'] = self.load_balancing_loss_weight * load_balancing_loss(self._router_logits, top_k)
            losses['total'] = losses['total'] + losses['lbl']
        if self._router_logits and self.router_zloss_weight > 0:
            losses['router_zloss'] = self.router_zloss_weight * router_z_loss(self._router_logits)
            losses['total'] = losses['total'] + losses['router_zloss']
        self._router_logits.clear()
        return losses

    def _check_recorded_logits(self) -> None:
        n = len(self._router_logits)
        assert n == self._num_routers, f'recorded {n} sets of router logits for {self._num_routers} routers'
        if not all(x.requires_grad for x in self._router_logits):
            raise ValueError(
                'router logits carry no gradient, so the load-balancing / z-loss would not train the router: '
                'reentrant activation checkpointing runs the forward under no_grad; set '
                'fsdp_config.activation_checkpointing_reentrant: false',
            )


def _check_same_ffn_type_on_all_ranks(ffn_type: str) -> None:
    """The backend is probed per process (moe_backend.py); ranks that disagree would not share a layout of work."""
    from composer.utils import dist
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    types = dist.all_gather_object(ffn_type)
    if len(set(types)) > 1:
        raise ValueError(f'model.ffn_config.ffn_type differs between ranks {types}: upcycle.backend: auto probed '
                         'megablocks differently on different nodes; set upcycle.backend explicitly')
