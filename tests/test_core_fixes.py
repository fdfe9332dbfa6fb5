"""Router weight variants (issue 7 item 6) and the scale-path defects of issue 8 that CPU can show."""
from __future__ import annotations

import math

import pytest
import torch

from foundry_upcycle.config import UpcycleConfig, moe_ffn_config
from test_upcycle import build, logits, mpt_cfg, upcycled


# -- router_weights: renormalized | softmax ------------------------------------------------------------------------
def test_router_weights_option_and_ffn_config():
    dense = mpt_cfg()
    assert moe_ffn_config(dense, UpcycleConfig(), 'torch')['moe_normalize_expert_weights'] == 1
    soft = UpcycleConfig(router_weights='softmax', num_experts=8, top_k=2)
    assert moe_ffn_config(dense, soft, 'torch')['moe_normalize_expert_weights'] is None
    assert moe_ffn_config(dense, soft, 'megablocks')['moe_normalize_expert_weights'] is None
    assert soft.expert_output_scale == 4.0 and UpcycleConfig().expert_output_scale == 1.0
    assert not soft.exact and UpcycleConfig().exact
    with pytest.raises(ValueError, match='upcycle.router_weights'):
        UpcycleConfig(router_weights='sigmoid')
    with pytest.raises(ValueError, match='model.ffn_config.moe_normalize_expert_weights'):
        moe_ffn_config({**dense, 'ffn_config': {**dense['ffn_config'], 'moe_normalize_expert_weights': 1}}, soft,
                       'torch')


def test_softmax_router_weights_scale_the_dense_output_by_e_over_k_times_topk_mass():
    """Whole model: logits are not exact, but the last block's FFN output is dense * (E/K) * sum_topk p."""
    cfg = mpt_cfg()
    soft = UpcycleConfig(num_experts=8, top_k=2, router_weights='softmax')
    dense, moe = upcycled(cfg, soft)
    ffn_d, ffn_m = dense.model.transformer.blocks[0].ffn, moe.model.transformer.blocks[0].ffn
    x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        d, m = ffn_d(x), ffn_m(x)
        s = ffn_m.router.layer(x.view(-1, 64)).softmax(-1).topk(2, -1).values.sum(-1).view(2, 16, 1)
    assert torch.allclose(m, d * 4.0 * s, rtol=1e-5, atol=1e-6)
    rel = ((m - d).norm(dim=-1) / d.norm(dim=-1))
    assert 0 < rel.max().item() <= 3.0  # K/E <= S <= 1: between dense and (E/K) dense
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(logits(dense, ids), logits(moe, ids), atol=1e-4)  # documented: close, not exact


@pytest.mark.parametrize('router_weights', ['renormalized', 'softmax'])
def test_language_loss_gives_the_router_a_gradient_only_without_renormalisation(router_weights):
    """README claim: identical experts + renormalised top-k = zero router gradient from the language loss."""
    _, moe = upcycled(mpt_cfg(), UpcycleConfig(num_experts=4, top_k=2, router_weights=router_weights))
    moe.train()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    out = moe({'input_ids': ids, 'labels': ids})
    torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    grad = moe.model.transformer.blocks[0].ffn.router.layer.weight.grad
    if router_weights == 'renormalized':
        assert grad is None or grad.abs().max().item() < 1e-7
    else:
        assert grad.abs().max().item() > 1e-4
