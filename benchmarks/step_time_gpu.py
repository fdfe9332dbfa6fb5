"""Upcycled vs CPT (dense) training step time at the paper's 436M width, against the active-FLOP ratio.

d_model 1024, FFN 2560 (SiLU-GLU), 16 heads / 4 KV heads, rope; `--layers` blocks (default 4, the 22-layer
model's per-layer ratio is the same up to the embedding/head share); 8 experts top-2 via mb_dmoe when megablocks
runs here (else torch_dmoe, which is not what a GPU run would use: the output says which). bf16 autocast, AdamW,
interleaved measurement (dense step, MoE step, ...) after warm-up; median step time. GPU only.

    .venv/bin/python benchmarks/step_time_gpu.py [--layers 4 --batch 8 --seq 2048 --steps 20] [--json OUT.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from foundry_upcycle.config import UpcycleConfig
from foundry_upcycle.moe_backend import resolve_backend
from foundry_upcycle.study.flops import train_flops_per_token
from foundry_upcycle.transforms import upcycled_model_config

PAPER_436M_RATIO = 1.33  # active training FLOPs per token, upcycled / dense, full 22-layer model (README, paper)


def dense_config(layers: int, seq: int, vocab: int) -> dict:
    return {'name': 'mpt_causal_lm', 'd_model': 1024, 'n_heads': 16, 'n_layers': layers, 'max_seq_len': seq,
            'vocab_size': vocab, 'no_bias': True, 'norm_type': 'rmsnorm', 'tie_word_embeddings': False,
            'learned_pos_emb': False, 'loss_fn': 'torch_crossentropy',
            'attn_config': {'attn_type': 'grouped_query_attention', 'attn_impl': 'torch', 'kv_n_heads': 4,
                            'rope': True, 'rope_impl': 'hf', 'rope_theta': 500000},
            'ffn_config': {'ffn_type': 'mptglu', 'ffn_hidden_size': 2560, 'ffn_act_fn': {'name': 'silu'}}}


def build(cfg: dict):
    from llmfoundry.models.mpt import ComposerMPTCausalLM
    from foundry_upcycle.model import ComposerMPTUpcycleCausalLM
    cls = ComposerMPTUpcycleCausalLM if cfg['name'] == 'mpt_upcycle_causal_lm' else ComposerMPTCausalLM
    kwargs = {k: v for k, v in cfg.items() if k != 'name'}
    model = cls(**kwargs, init_device='cuda').train()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def one_step(model, opt, batch) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.autocast('cuda', dtype=torch.bfloat16):
        losses = model.loss(model(batch), batch)
    total = losses['total'] if isinstance(losses, dict) else losses
    total.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument('--layers', type=int, default=4)
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--seq', type=int, default=2048)
    p.add_argument('--vocab', type=int, default=32000)
    p.add_argument('--warmup', type=int, default=5)
    p.add_argument('--steps', type=int, default=20)
    p.add_argument('--json', default=None)
    args = p.parse_args()
    assert torch.cuda.is_available(), 'GPU benchmark'
    dense = dense_config(args.layers, args.seq, args.vocab)
    backend = resolve_backend('auto', 'amp_bf16')
    moe = upcycled_model_config(dense, UpcycleConfig(num_experts=8, top_k=2), backend)
    flop_ratio = train_flops_per_token(moe, args.seq) / train_flops_per_token(dense, args.seq)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device='cuda')
    batch = {'input_ids': ids, 'labels': ids}
    arms = {'cpt': build(dense), 'upcycle': build(moe)}
    times: dict[str, list[float]] = {k: [] for k in arms}
    for i in range(args.warmup + args.steps):
        for name, (model, opt) in arms.items():  # interleaved: both arms see the same GPU state
            t = one_step(model, opt, batch)
            if i >= args.warmup:
                times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        'gpu': torch.cuda.get_device_name(), 'moe_ffn_type': moe['ffn_config']['ffn_type'], 'layers': args.layers,
        'batch': args.batch, 'seq': args.seq, 'median_step_s': med,
        'step_time_ratio': med['upcycle'] / med['cpt'], 'active_flop_ratio_this_shape': flop_ratio,
        'active_flop_ratio_paper_436m': PAPER_436M_RATIO,
        'tokens_per_s': {k: args.batch * args.seq / v for k, v in med.items()},
        'peak_mem_gib': torch.cuda.max_memory_allocated() / 2**30,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=2)


if __name__ == '__main__':
    main()
