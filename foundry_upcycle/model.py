"""Registered model `mpt_upcycle_causal_lm`: foundry's MPT plus router losses for `torch_dmoe`.

Foundry adds megablocks' load-balancing loss for `mb_dmoe` but none for `torch_dmoe`. This class records
every router's logits with forward hooks and adds the load-balancing loss (and an optional z-loss).
The loss is a dict, so Composer logs the language loss and each auxiliary term apart:
`loss/train/loss`, `loss/train/lbl`, `loss/train/router_zloss`, `loss/train/total`.
"""
from __future__ import annotations

from typing import Any, Mapping, MutableMapping, Union

import torch
from llmfoundry.models.mpt import ComposerMPTCausalLM

from foundry_upcycle.losses import load_balancing_loss, router_z_loss

ROUTER_SUFFIX = 'ffn.router.layer'


class ComposerMPTUpcycleCausalLM(ComposerMPTCausalLM):

    def __init__(self, *args: Any, load_balancing_loss_weight: float = 0.0, router_zloss_weight: float = 0.0,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.load_balancing_loss_weight = float(load_balancing_loss_weight)
        self.router_zloss_weight = float(router_zloss_weight)
        self._router_logits: list[torch.Tensor] = []
        routers = [m for name, m in self.model.named_modules() if name.endswith(ROUTER_SUFFIX)]
        if not routers:
            raise ValueError('mpt_upcycle_causal_lm: model.ffn_config has no MoE router (expected torch_dmoe/mb_dmoe)')
        for router in routers:
            router.register_forward_hook(self._record_logits)

    def _record_logits(self, module: torch.nn.Module, inputs: Any, logits: torch.Tensor) -> None:
        if self.training:
            self._router_logits.append(logits)

    def forward(self, batch: MutableMapping):
        self._router_logits.clear()
        return super().forward(batch)

    def loss(self, outputs: Any, batch: Mapping) -> Union[dict, torch.Tensor]:
        base = super().loss(outputs, batch)
        losses = dict(base) if isinstance(base, dict) else {'total': base, 'loss': base}
        if self._router_logits and self.load_balancing_loss_weight > 0:
            top_k = self.config.ffn_config['moe_top_k']
            losses['lbl'] = self.load_balancing_loss_weight * load_balancing_loss(self._router_logits, top_k)
            losses['total'] = losses['total'] + losses['lbl']
        if self._router_logits and self.router_zloss_weight > 0:
            losses['router_zloss'] = self.router_zloss_weight * router_z_loss(self._router_logits)
            losses['total'] = losses['total'] + losses['router_zloss']
        self._router_logits.clear()
        return losses
