"""Router auxiliary losses, computed from router logits. Imports only torch.

Shapes: T tokens, E experts, K top_k, L MoE layers.
"""
from __future__ import annotations

from typing import Sequence

import torch


def load_balancing_loss(router_logits: Sequence[torch.Tensor], top_k: int) -> torch.Tensor:
    """Switch-style load-balancing loss, averaged over layers, scaled like megablocks' batched loss:
    E / (T*K) * sum_e tokens_e * mean_t p_e, which is 1.0 for perfectly uniform routing.
    router_logits: one [T, E] tensor per layer."""
    assert router_logits, 'no router logits were recorded'
    losses = []
    for logits in router_logits:
        t, e = logits.shape
        probs = logits.float().softmax(dim=-1)  # [T, E]
        top = probs.topk(top_k, dim=-1).indices  # [T, K]
        tokens_per_expert = torch.bincount(top.flatten(), minlength=e).to(probs.dtype)  # [E]
        losses.append(e / (t * top_k) * torch.dot(tokens_per_expert, probs.mean(dim=0)))
    return torch.stack(losses).mean()


def router_z_loss(router_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2, averaged over layers."""
    assert router_logits, 'no router logits were recorded'
    return torch.stack([torch.logsumexp(x.float(), dim=-1).square().mean() for x in router_logits]).mean()
