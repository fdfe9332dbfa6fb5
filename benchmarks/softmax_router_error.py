"""How far a freshly upcycled layer with `router_weights: softmax` is from the dense FFN.

A fresh layer computes dense(x) * (E/K) * sum_topk softmax(router(x)), so its relative error per token is
r = (E/K) * S - 1 with S the sum of the top-k probabilities (K/E <= S <= 1, so 0 <= r <= E/K - 1), bounded by
(E - K)(e^Delta - 1) / (K e^Delta + E - K) for router logits spread Delta. This prints r over random unit-RMS
inputs (what a unit-gain RMSNorm feeds the router) for the tiny test shape and the paper's 436M router init,
and checks the identity on a real foundry torch_dmoe layer at the tiny shape.

    .venv/bin/python benchmarks/softmax_router_error.py
"""
from __future__ import annotations

import math

import torch

from foundry_upcycle.config import UpcycleConfig


def relative_error(d_model: int, experts: int, top_k: int, std: float, tokens: int = 4096, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    router = torch.randn(experts, d_model, generator=g) * std
    x = torch.randn(tokens, d_model, generator=g)  # unit RMS
    logits = x @ router.T  # [T, E]
    s = logits.softmax(-1).topk(top_k, dim=-1).values.sum(-1)  # [T]
    r = experts / top_k * s - 1
    delta = logits.max(-1).values - logits.min(-1).values
    bound = (experts - top_k) * (delta.exp() - 1) / (top_k * delta.exp() + experts - top_k)
    assert bool((r <= bound + 1e-6).all()), 'bound violated'
    return r, bound


def layer_check(d_model=64, ffn=160, experts=8, top_k=2, std=0.02):
    """max |moe(x) - dense(x) * (E/K) * S| / |dense(x)|, and max relative error moe vs dense, on foundry layers."""
    from llmfoundry.models.layers.dmoe import dMoE
    from llmfoundry.models.layers.ffn import MPTGLU
    from foundry_upcycle.upcycle import ffn_moe_tensors
    torch.manual_seed(0)
    dense = MPTGLU(d_model, ffn / d_model, fc_type={'name': 'torch', 'bias': False}, ffn_hidden_size=ffn,
                   act_fn=torch.nn.SiLU(), device='cpu', bias=False)
    moe = dMoE(device='cpu', hidden_size=d_model, ffn_hidden_size=ffn, moe_num_experts=experts, moe_top_k=top_k,
               mlp_type='glu', activation_fn=torch.nn.SiLU(), moe_jitter_eps=None, moe_normalize_expert_weights=None,
               uniform_expert_assignment=False, bias=False)
    ucfg = UpcycleConfig(num_experts=experts, top_k=top_k, router_weights='softmax', router_init_std=std)
    tensors = ffn_moe_tensors({k: v.detach() for k, v in dense.state_dict().items()}, ucfg.weights())
    moe.load_state_dict(tensors, strict=True)
    x = torch.randn(1, 512, d_model)
    with torch.no_grad():
        d, m = dense(x)[0], moe(x)[0]
        s = moe.router.layer(x[0]).softmax(-1).topk(top_k, -1).values.sum(-1, keepdim=True)
    identity = ((m - d * (experts / top_k) * s).norm(dim=-1) / d.norm(dim=-1)).max().item()
    rel = ((m - d).norm(dim=-1) / d.norm(dim=-1))
    return identity, rel


def main():
    identity, rel = layer_check()
    print(f'tiny foundry torch_dmoe layer (d 64, F 160, E 8, K 2, std 0.02): identity residual {identity:.1e}; '
          f'relative error vs dense: max {rel.max():.4f}, mean {rel.mean():.4f}')
    for name, d, e, k, std in (('tiny (d 64)', 64, 8, 2, 0.02), ('436M (d 1024)', 1024, 8, 2, 0.02),
                               ('1.4B (d 2048)', 2048, 8, 2, 0.02), ('436M, smaller router init', 1024, 8, 2, 0.003)):
        r, bound = relative_error(d, e, k, std)
        print(f'{name}, E={e}, K={k}, router std {std}: relative error max {r.max():.4f}, mean {r.mean():.4f}, '
              f'median {r.median():.4f}; bound max {bound.max():.4f}; worst case E/K-1 = {e / k - 1:g}')


if __name__ == '__main__':
    main()
