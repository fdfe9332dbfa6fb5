"""Function preservation of the pure weight transform on real foundry models, plus its refusals."""
from __future__ import annotations

import math

import pytest
import torch

from foundry_upcycle.config import UpcycleConfig, moe_ffn_config
from foundry_upcycle.losses import load_balancing_loss, router_z_loss
from foundry_upcycle.upcycle import check_shapes, expert_spread, upcycle_state_dict


def mpt_cfg(ffn_type='mptglu', act='silu', rope=True, kv_heads=2, no_bias=True):
    return {
        'd_model': 64, 'n_heads': 4, 'n_layers': 2, 'max_seq_len': 32, 'vocab_size': 128, 'no_bias': no_bias,
        'expansion_ratio': 2.5, 'norm_type': 'rmsnorm' if rope else 'low_precision_layernorm',
        'tie_word_embeddings': not rope, 'learned_pos_emb': not rope,
        'attn_config': {'attn_impl': 'torch', 'attn_type': 'grouped_query_attention', 'kv_n_heads': kv_heads,
                        'rope': rope, 'rope_impl': 'hf'},
        'ffn_config': {'ffn_type': ffn_type, **({'ffn_act_fn': {'name': act}} if act else {})},
        'loss_fn': 'torch_crossentropy',
    }


def build(cfg):
    from llmfoundry.models.mpt import ComposerMPTCausalLM
    torch.manual_seed(0)
    return ComposerMPTCausalLM(**cfg).eval()


def logits(model, ids):
    with torch.no_grad():
        return model({'input_ids': ids}).logits


def upcycled(dense_cfg, ucfg: UpcycleConfig):
    dense = build(dense_cfg)
    moe_cfg = {**dense_cfg, 'ffn_config': moe_ffn_config(dense_cfg, ucfg, 'torch')}
    moe = build(moe_cfg)
    sd = upcycle_state_dict(dense.state_dict(), ucfg.num_experts, ucfg.router_init_std, ucfg.seed,
                            ucfg.expert_noise_std, ucfg.expert_output_scale)
    check_shapes(sd, {k: v.shape for k, v in moe.state_dict().items()}, 'test')
    moe.load_state_dict(sd, strict=True)
    return dense, moe


@pytest.mark.parametrize('ffn_type, act, rope, kv, experts, top_k', [
    ('mptglu', 'silu', True, 2, 8, 2),   # Llama-like: GQA + rope + SiLU-GLU
    ('mptglu', None, True, 1, 4, 1),     # MQA, MPT's default exact GELU, top-1
    ('mptmlp', None, False, 4, 4, 2),    # plain MLP, MHA, learned positions, LayerNorm
    ('mptmlp', 'relu', True, 2, 2, 2),   # top_k == num_experts
])
def test_upcycled_logits_equal_dense(ffn_type, act, rope, kv, experts, top_k):
    cfg = mpt_cfg(ffn_type, act, rope, kv)
    dense, moe = upcycled(cfg, UpcycleConfig(num_experts=experts, top_k=top_k, seed=1))
    ids = torch.randint(0, 128, (3, 32), generator=torch.Generator().manual_seed(0))
    diff = (logits(dense, ids) - logits(moe, ids)).abs().max().item()
    assert diff <= 1e-5, diff
    # The routers are random (not zero), so routing is not uniform, yet the output is exact.
    router = moe.model.transformer.blocks[0].ffn.router.layer.weight
    assert router.abs().max() > 0 and expert_spread(moe.model.transformer.blocks[0].ffn.experts.mlp.w1, experts) == 0


def test_noise_breaks_exactness_and_copies():
    cfg = mpt_cfg()
    dense, moe = upcycled(cfg, UpcycleConfig(num_experts=4, expert_noise_std=0.1))
    ids = torch.randint(0, 128, (2, 32))
    assert (logits(dense, ids) - logits(moe, ids)).abs().max() > 1e-4
    assert expert_spread(moe.model.transformer.blocks[0].ffn.experts.mlp.w1, 4) > 0


def test_router_is_seeded():
    sd = build(mpt_cfg()).state_dict()
    key = 'model.transformer.blocks.1.ffn.router.layer.weight'
    a, b, c = (upcycle_state_dict(sd, 4, 0.02, seed)[key] for seed in (5, 5, 6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_router_init_is_normal_with_the_requested_std():
    """All routers' weights (2 layers x 16 experts x d_model 64 = n = 2048) are N(0, std^2) draws: (n-1) s^2 / std^2
    is chi^2(n-1), the mean is N(0, std^2 / n). Two-sided bounds at a false-failure rate of 1e-6 each (the seed is
    fixed, so this is about which seeds a correct init could fail on): s/std within about +-7.6%, mean within
    4.9 std / sqrt(n). A 10% scale error, a uniform init of the same range, or the default std fail."""
    from statistics import NormalDist
    std, p = 0.03, 1e-6
    sd = upcycle_state_dict(build(mpt_cfg()).state_dict(), 16, std, seed=11)
    w = torch.cat([v.flatten() for k, v in sd.items() if k.endswith('router.layer.weight')]).double()
    n, z = w.numel(), NormalDist().inv_cdf(1 - p / 2)
    assert n == 2 * 16 * 64

    def chi2_quantile(zq: float, k: int) -> float:  # Wilson-Hilferty, relative error < 1e-4 at k ~ 2000
        return k * (1 - 2 / (9 * k) + zq * math.sqrt(2 / (9 * k)))**3

    lo, hi = (math.sqrt(chi2_quantile(zq, n - 1) / (n - 1)) for zq in (-z, z))
    ratio = w.std().item() / std
    assert lo < ratio < hi, (lo, ratio, hi)
    assert abs(w.mean().item()) < z * std / math.sqrt(n)
    # normal, not uniform: the excess kurtosis (0 for a normal, -1.2 for a uniform) has sd sqrt(24 / n)
    kurt = ((w - w.mean())**4).mean().item() / w.var(unbiased=False).item()**2 - 3
    assert abs(kurt) < z * math.sqrt(24 / n), kurt


def test_refuses_moe_and_biased_checkpoints():
    moe_sd = upcycle_state_dict(build(mpt_cfg()).state_dict(), 4)
    with pytest.raises(ValueError, match='already has a mixture-of-experts'):
        upcycle_state_dict(moe_sd, 4)
    biased = build(mpt_cfg(no_bias=False)).state_dict()
    with pytest.raises(ValueError, match='biases'):
        upcycle_state_dict(biased, 4)
    with pytest.raises(ValueError, match='not an MPT state dict'):
        upcycle_state_dict({'weight': torch.zeros(2)}, 4)


def test_shape_mismatch_names_the_key():
    sd = upcycle_state_dict(build(mpt_cfg()).state_dict(), 4)
    wide = build({**mpt_cfg(), 'ffn_config': moe_ffn_config({**mpt_cfg(), 'expansion_ratio': 3},
                                                            UpcycleConfig(num_experts=4), 'torch')})
    with pytest.raises(ValueError, match=r'ffn\.experts\.mlp\.w1 has shape \(640, 64\).*expects \(768, 64\)'):
        check_shapes(sd, {k: v.shape for k, v in wide.state_dict().items()}, 'test')


def test_load_balancing_loss_scale():
    t, e, k = 64, 4, 2
    uniform = torch.zeros(t, e)  # equal scores; topk picks the first k -> imbalanced counts, balanced probs
    assert load_balancing_loss([uniform], k).item() == pytest.approx(1.0)
    collapsed = torch.zeros(t, e)
    collapsed[:, :k] = 20.0  # all tokens to experts 0, 1 with prob ~1/2 each
    assert load_balancing_loss([collapsed], k).item() == pytest.approx(e / k, rel=1e-3)
    z = router_z_loss([torch.zeros(t, e)])
    assert z.item() == pytest.approx(torch.log(torch.tensor(float(e))).item() ** 2)
