"""Routing overhead on CPU: MoE layer fwd+bwd time / (top_k x dense FFN fwd+bwd time), over token counts.

A ratio of 1.0 means the MoE costs exactly its active compute; above 1.0 is the price of routing, the
per-expert gather/scatter and the smaller GEMMs. Layers are foundry's own: MPTGLU (dense) and torch_dmoe,
built from the same upcycled weights.

    .venv/bin/python benchmarks/routing_overhead.py [--d-model 256 --ffn 640 --experts 8 --top-k 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def build(d_model: int, ffn: int, experts: int, top_k: int):
    from llmfoundry.models.layers.ffn import build_mptglu, build_torch_dmoe

    from foundry_upcycle.upcycle import UpcycleWeights, ffn_moe_tensors
    torch.manual_seed(0)
    act = {'name': 'silu'}
    dense = build_mptglu(d_model, 0, ffn_hidden_size=ffn, ffn_act_fn=act, bias=False,
                         fc_type={'name': 'torch', 'bias': False})
    moe = build_torch_dmoe(d_model, 0, ffn_hidden_size=ffn, ffn_act_fn=act, bias=False, moe_num_experts=experts,
                           moe_top_k=top_k, mlp_type='glu', moe_jitter_eps=None, moe_normalize_expert_weights=1,
                           uniform_expert_assignment=False)
    sd = dense.state_dict()
    moe.load_state_dict(ffn_moe_tensors(sd, UpcycleWeights(num_experts=experts)))
    return dense, moe


def fwd_bwd_seconds(layer: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    times = []
    for i in range(repeats + 2):
        layer.zero_grad(set_to_none=True)
        xi = x.detach().requires_grad_()
        start = time.perf_counter()
        layer(xi).sum().backward()
        if i >= 2:  # 2 warm-up iterations
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--d-model', type=int, default=256)
    p.add_argument('--ffn', type=int, default=640)
    p.add_argument('--experts', type=int, default=8)
    p.add_argument('--top-k', type=int, default=2)
    p.add_argument('--tokens', default='256,1024,4096,8192')
    p.add_argument('--repeats', type=int, default=7)
    p.add_argument('--threads', type=int, default=torch.get_num_threads())
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dense, moe = build(args.d_model, args.ffn, args.experts, args.top_k)
    print(f'# routing overhead, CPU, {args.threads} threads, torch {torch.__version__}: D={args.d_model} '
          f'F={args.ffn} E={args.experts} K={args.top_k}, median of {args.repeats} fwd+bwd')
    print(f'{"tokens":>8} {"dense ms":>10} {"moe ms":>10} {"moe/(K*dense)":>14}')
    for t in (int(s) for s in args.tokens.split(',')):
        x = torch.randn(1, t, args.d_model)
        with torch.no_grad():
            assert torch.allclose(dense(x), moe(x), atol=1e-5), 'upcycled MoE must equal the dense FFN'
        td = fwd_bwd_seconds(dense, x, args.repeats)
        tm = fwd_bwd_seconds(moe, x, args.repeats)
        print(f'{t:>8} {td * 1e3:>10.2f} {tm * 1e3:>10.2f} {tm / (args.top_k * td):>14.2f}')


if __name__ == '__main__':
    main()
