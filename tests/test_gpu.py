"""MegaBlocks (`mb_dmoe`, grouped GEMM) against foundry's `torch_dmoe` on the same upcycled weights.

GPU only: skipped without CUDA and the `gpu` extra. Run on a GPU machine with
    .venv/bin/python -m pytest -q -m gpu tests/test_gpu.py -s
It prints the measured differences; docs/benchmarks.md records them.
"""
from __future__ import annotations

import pytest
import torch

from foundry_upcycle.config import UpcycleConfig, moe_ffn_config
from foundry_upcycle.moe_backend import megablocks_unavailable_reason
from foundry_upcycle.upcycle import upcycle_state_dict

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(megablocks_unavailable_reason() is not None,
                       reason=f'needs CUDA + megablocks: {megablocks_unavailable_reason()}'),
]

DENSE = {'d_model': 256, 'n_heads': 4, 'n_layers': 2, 'max_seq_len': 128, 'vocab_size': 512, 'no_bias': True,
         'expansion_ratio': 2.5, 'norm_type': 'rmsnorm', 'tie_word_embeddings': False, 'learned_pos_emb': False,
         'attn_config': {'attn_impl': 'torch', 'attn_type': 'grouped_query_attention', 'kv_n_heads': 2, 'rope': True,
                         'rope_impl': 'hf'},
         'ffn_config': {'ffn_type': 'mptglu', 'ffn_act_fn': {'name': 'silu'}}, 'loss_fn': 'torch_crossentropy'}


def _model(ffn_config, state_dict):
    from llmfoundry.models.mpt import ComposerMPTCausalLM
    model = ComposerMPTCausalLM(**{**DENSE, 'ffn_config': ffn_config, 'init_device': 'cuda'})
    model.load_state_dict(state_dict, strict=True)
    return model.to(torch.bfloat16).train()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_mb_dmoe_matches_torch_dmoe_forward_backward_step():
    from llmfoundry.models.mpt import ComposerMPTCausalLM
    torch.manual_seed(0)
    dense = ComposerMPTCausalLM(**DENSE)
    ucfg = UpcycleConfig(num_experts=8, top_k=2, seed=0)
    sd = upcycle_state_dict(dense.state_dict(), 8, 0.5, 0)  # a strong router so routing decisions matter
    torch_m = _model(moe_ffn_config(DENSE, ucfg, 'torch'), sd)
    mb_m = _model(moe_ffn_config(DENSE, ucfg, 'megablocks'), sd)
    ids = torch.randint(0, 512, (4, 128), device='cuda', generator=torch.Generator('cuda').manual_seed(0))
    batch = {'input_ids': ids, 'labels': ids}

    def step(model):
        logits = model(batch).logits
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        ce.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
        opt.step()
        return logits.detach(), ce.item(), grads, {n: p.detach().clone() for n, p in model.named_parameters()}

    lt, ct, gt, pt = step(torch_m)
    lm, cm, gm, pm = step(mb_m)
    logit_rel = _rel(lm, lt)
    grad_rel = max(_rel(gm[n], gt[n]) for n in gt if 'ffn' in n)
    param_rel = max(_rel(pm[n], pt[n]) for n in pt)
    print(f'\nmb_dmoe vs torch_dmoe (bf16): logits rel {logit_rel:.2e}, CE {cm:.5f} vs {ct:.5f}, '
          f'max FFN grad rel {grad_rel:.2e}, max param rel after 1 AdamW step {param_rel:.2e}')
    assert logit_rel < 2e-2 and abs(cm - ct) < 1e-2
    assert grad_rel < 5e-2 and param_rel < 1e-2
