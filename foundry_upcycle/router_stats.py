"""Router health statistics: per-expert load, router entropy, load-balancing loss, expert spread. Imports only torch.

Shapes: T tokens, E experts, K top_k, F ffn_hidden_size, D d_model.
"""
from __future__ import annotations

from typing import Mapping

import torch

EXPERT_TENSORS = ('w1', 'v1', 'w2')


def routing_sums(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Additive routing statistics of one router call, so microbatches and ranks can be summed.

    logits: [T, E]. Returns [2E + 2] = (top-k assignments per expert [E], sum over tokens of the router
    probabilities [E], sum over tokens of the router entropy in nats, T).
    """
    logits = logits.detach().float()
    t, e = logits.shape
    logp = logits.log_softmax(dim=-1)  # [T, E]
    probs = logp.exp()
    counts = torch.bincount(probs.topk(top_k, dim=-1).indices.flatten(), minlength=e).to(probs.dtype)  # [E]
    entropy = -(probs * logp).sum()
    return torch.cat([counts, probs.sum(dim=0), entropy.reshape(1), probs.new_tensor([t])])


def routing_metrics(sums: torch.Tensor, top_k: int) -> dict[str, torch.Tensor]:
    """routing_sums (possibly summed over calls) -> load [E] (sums to 1), mean entropy, unweighted LBL.

    LBL as megablocks scales it: E / (T*K) * sum_e tokens_e * mean_t p_e (1.0 for uniform routing).
    """
    e = (sums.numel() - 2) // 2
    counts, prob_sum, entropy_sum, t = sums[:e], sums[e:2 * e], sums[2 * e], sums[2 * e + 1]
    return {
        'load': counts / (t * top_k),
        'entropy': entropy_sum / t,
        'lbl': e / (t * top_k) * torch.dot(counts, prob_sum / t),
    }


def expert_spread_sums(tensors: Mapping[str, torch.Tensor], num_local_experts: int, num_experts: int,
                       group=None, granularity: int = 1, grow: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distance of each local expert to the mean expert of its shard position [G, E_local/G], and the
    squared norm of that mean expert [G, 1], summed over the given [E_local*f, D] tensors (w1, v1, w2).

    Fine-grained experts (granularity G; expert j = (e*G + g)*m + c, m = grow) hold different shards g of the dense
    FFN, so each is compared with the experts of its own shard (G = 1: all experts together).
    group None: the tensors hold every expert; differences are taken relative to the first expert of each shard,
    so fresh copies give exactly 0. With expert parallelism, `group` is the expert-parallel process group: the
    mean expert is one all-reduce of the local sums (no parameter gather)."""
    g, m = granularity, grow
    dist2 = 0.0
    norm2 = 0.0
    for w in tensors.values():
        w = w.detach().float().reshape(num_local_experts // (g * m), g, m, -1)     # [E', G, m, f*D]
        w = w.transpose(0, 1).reshape(g, num_local_experts // g, -1)              # [G, E_local/G, f*D]
        if group is None:
            base = w[:, :1]
            delta = w - base
            mean_delta = delta.mean(dim=1, keepdim=True)
        else:
            total = w.sum(dim=1, keepdim=True)
            torch.distributed.all_reduce(total, group=group)
            base, mean_delta = total / (num_experts // g), 0.0   # base: the mean expert of each shard [G, 1, f*D]
            delta = w - base
        dist2 = dist2 + (delta - mean_delta).square().sum(dim=-1)
        norm2 = norm2 + (base + mean_delta).square().sum(dim=-1)
    return dist2, norm2


def expert_spread(tensors: Mapping[str, torch.Tensor], num_experts: int, granularity: int = 1,
                  grow: int = 1) -> float:
    """Mean over experts of ||W_e - mean W|| / ||mean W||, W_e = expert e's slices of w1, v1, w2 together, the mean
    taken over the experts of e's shard (fine-grained). 0.0 for fresh copies; grows as the experts move apart."""
    dist2, norm2 = expert_spread_sums(tensors, num_experts, num_experts, None, granularity, grow)
    return (dist2.sqrt() / norm2.sqrt()).mean().item()
