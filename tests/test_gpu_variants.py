"""MegaBlocks (`mb_dmoe`) holds every variant: fine-grained experts, an MoE on some blocks (its load-balancing loss
then averages over the MoE blocks only: `mpt_upcycle_causal_lm` sets megablocks' `num_layers` to their count),
grown and Drop-Upcycled experts. GPU only (not run in this repository's sessions: no GPU was lent).

    .venv/bin/python -m pytest -q -m gpu tests/test_gpu_variants.py -s
"""
from __future__ import annotations

import pytest
import torch

from foundry_upcycle.config import UpcycleConfig
from foundry_upcycle.moe_backend import megablocks_unavailable_reason
from foundry_upcycle.upcycle import upcycle_state_dict
from test_gpu import DENSE, TOL, _ids, build, differences, step

_REASON = megablocks_unavailable_reason()
BLOCK = UpcycleConfig(num_experts=4, top_k=1, granularity=2, moe_layers=[1], load_balancing_loss_weight=0.01)


def _build(backend: str, state_dict, device: str):
    return build(backend, state_dict, device, BLOCK)


@pytest.mark.gpu
@pytest.mark.skipif(_REASON is not None, reason=f'needs CUDA + megablocks: {_REASON}')
def test_mb_dmoe_fine_grained_on_some_blocks_matches_torch_dmoe():
    from llmfoundry.models.mpt import ComposerMPTCausalLM
    torch.manual_seed(0)
    dense = ComposerMPTCausalLM(**DENSE)
    w = BLOCK.weights()
    sd = upcycle_state_dict(dense.state_dict(), w.num_experts, router_init_std=0.5, granularity=w.granularity,
                            moe_layers=w.moe_layers, expert_noise_std=0.5)
    mb_model = _build('megablocks', sd, 'cuda')
    assert mb_model.model.transformer.mb_args.num_layers == 1
    ref = step(_build('torch', sd, 'cuda'), _ids('cuda'), torch.bfloat16)
    mb = step(mb_model, _ids('cuda'), torch.bfloat16)
    diff = differences(mb, ref)
    print(f'\nmb_dmoe vs torch_dmoe, fine-grained G=2 on block 1 only (bf16, GPU): {diff}')
    for key, tol in TOL.items():
        assert diff[key] < tol, (key, diff[key], tol)
