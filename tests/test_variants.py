"""The upcycling variants as weight math and models (no training): fine-grained experts, MoE on some blocks, growing
an MoE (exact), Drop-Upcycling (not exact: its re-drawn fraction, subsets and statistics), their parameter / FLOP
accounting, the block's refusals, and where each exports."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from foundry_upcycle.config import UpcycleConfig, moe_model_fields
from foundry_upcycle.upcycle import check_shapes, upcycle_state_dict
from foundry_upcycle.weights import UpcycleWeights, dropped_rows, expert_matrix, router_weight

D, L, V = 64, 4, 128


def mpt_cfg(ffn_type='mptglu', act='silu', n_layers=L):
    return {
        'd_model': D, 'n_heads': 4, 'n_layers': n_layers, 'max_seq_len': 32, 'vocab_size': V, 'no_bias': True,
        'expansion_ratio': 2.5, 'norm_type': 'rmsnorm', 'tie_word_embeddings': False, 'learned_pos_emb': False,
        'attn_config': {'attn_impl': 'torch', 'attn_type': 'grouped_query_attention', 'kv_n_heads': 2,
                        'rope': True, 'rope_impl': 'hf'},
        'ffn_config': {'ffn_type': ffn_type, **({'ffn_act_fn': {'name': act}} if act else {})},
        'loss_fn': 'torch_crossentropy',
    }


def build(cfg, seed=0):
    from foundry_upcycle.model import ComposerMPTUpcycleCausalLM
    from llmfoundry.models.mpt import ComposerMPTCausalLM
    torch.manual_seed(seed)
    moe = (cfg.get('ffn_config') or {}).get('ffn_type') == 'torch_dmoe'
    return (ComposerMPTUpcycleCausalLM if moe else ComposerMPTCausalLM)(**cfg).eval()


def logits(model, x=None):
    x = torch.randint(0, V, (3, 32), generator=torch.Generator().manual_seed(0)) if x is None else x
    with torch.no_grad():
        return model({'input_ids': x}).logits


def upcycle(dense_cfg, source_sd, ucfg: UpcycleConfig):
    """The upcycled model (built from the block's model fields) with the mapping's weights loaded strictly."""
    moe = build({**dense_cfg, **moe_model_fields(dense_cfg, ucfg, 'torch')})
    w = ucfg.weights()
    sd = upcycle_state_dict(source_sd, w.num_experts, w.router_init_std, w.seed, w.expert_noise_std,
                            w.expert_output_scale, granularity=w.granularity, drop_ratio=w.drop_ratio, grow=w.grow,
                            moe_layers=w.moe_layers)
    check_shapes(sd, {k: v.shape for k, v in moe.state_dict().items()}, 'test')
    moe.load_state_dict(sd, strict=True)
    return moe


@pytest.fixture(scope='module')
def dense():
    return build(mpt_cfg())


# ---- fine-grained experts -----------------------------------------------------------------------------------

@pytest.mark.parametrize('ffn_type, act, experts, top_k, g', [
    ('mptglu', 'silu', 4, 2, 2),    # SiLU-GLU (Llama-like)
    ('mptglu', None, 2, 1, 4),      # exact GELU GLU, top-1 copy -> top-4 shards
    ('mptmlp', 'relu', 4, 2, 5),    # plain MLP, F=160 in 5 shards of 32
])
def test_fine_grained_is_exact(ffn_type, act, experts, top_k, g):
    cfg = mpt_cfg(ffn_type, act, n_layers=2)
    base = build(cfg)
    moe = upcycle(cfg, base.state_dict(), UpcycleConfig(num_experts=experts, top_k=top_k, granularity=g, seed=3))
    ffn = moe.model.transformer.blocks[0].ffn
    assert moe.config.ffn_config['moe_num_experts'] == experts * g and moe.config.ffn_config['moe_top_k'] == top_k * g
    assert ffn.experts.mlp.w1.shape == (experts * 160, D)   # E*G experts of width F/G
    diff = (logits(base) - logits(moe)).abs().max().item()
    assert diff <= 1e-5, diff


def test_fine_grained_virtual_groups_and_shards(dense):
    """Expert j = e*G + g is rows g*F/G.. of copy e; the G shards of a copy share one router row; only w2 is scaled."""
    opts = UpcycleWeights(num_experts=4, granularity=2)
    gate = dense.state_dict()['model.transformer.blocks.0.ffn.gate_proj.weight']          # [160, 64]
    down = dense.state_dict()['model.transformer.blocks.0.ffn.down_proj.weight']          # [64, 160]
    for j in range(8):
        rows = slice((j % 2) * 80, (j % 2 + 1) * 80)
        assert torch.equal(expert_matrix(gate, opts, 0, 'gate', j), gate[rows])
        assert torch.allclose(expert_matrix(down.t(), opts, 0, 'down', j), 2 * down.t()[rows])
    router = router_weight(opts, 0, D)
    assert router.shape == (8, D) and torch.equal(router[0::2], router[1::2]) and not torch.equal(router[0], router[2])


def test_scaling_both_projections_megatron_style_is_not_exact(dense):
    """Megatron-Core spreads the factor G over the projections (cube root each for a GLU): not exact through SiLU.
    Scaling the down projection alone by G (ours) is."""
    cfg = mpt_cfg(n_layers=L)
    moe = upcycle(cfg, dense.state_dict(), UpcycleConfig(num_experts=4, top_k=2, granularity=2))
    exact = (logits(dense) - logits(moe)).abs().max().item()
    c = 2 ** (1 / 3)
    with torch.no_grad():
        for block in moe.model.transformer.blocks:
            mlp = block.ffn.experts.mlp
            mlp.w1.mul_(c)
            mlp.v1.mul_(c)
            mlp.w2.mul_(c / 2)   # undo our G, apply Megatron's cube root
    megatron = (logits(dense) - logits(moe)).abs().max().item()
    assert exact <= 1e-5 < 1e-2 < megatron, (exact, megatron)


def test_fine_grained_softmax_scale_is_exact_for_a_uniform_router(dense):
    """Softmax-then-top-k (no renormalisation): each shard gets p_e/G and the top-(kG) weights sum to k/E for a
    uniform router, so w2 x E*G/k is exact there (and approximate elsewhere, like the plain softmax ablation)."""
    cfg = mpt_cfg(n_layers=L)
    moe = upcycle(cfg, dense.state_dict(), UpcycleConfig(num_experts=4, top_k=2, granularity=2,
                                                         router_weights='softmax'))
    assert moe.config.ffn_config['moe_normalize_expert_weights'] is None
    with torch.no_grad():
        for block in moe.model.transformer.blocks:
            block.ffn.router.layer.weight.zero_()
    diff = (logits(dense) - logits(moe)).abs().max().item()
    assert diff <= 1e-5, diff


# ---- MoE on some blocks -------------------------------------------------------------------------------------

@pytest.mark.parametrize('moe_layers, expected', [(2, [0, 2]), ([1, 3], [1, 3]), ([3], [3])])
def test_moe_on_some_blocks_is_exact(dense, moe_layers, expected):
    cfg = mpt_cfg(n_layers=L)
    moe = upcycle(cfg, dense.state_dict(), UpcycleConfig(num_experts=4, top_k=2, moe_layers=moe_layers))
    kinds = [type(b.ffn).__name__ for b in moe.model.transformer.blocks]
    assert [i for i, k in enumerate(kinds) if k == 'dMoE'] == expected, kinds
    assert all(k == 'MPTGLU' for i, k in enumerate(kinds) if i not in expected), kinds
    assert (logits(dense) - logits(moe)).abs().max().item() <= 1e-5
    assert moe._num_routers == len(expected)


def test_layer_subset_combines_with_granularity(dense):
    moe = upcycle(mpt_cfg(), dense.state_dict(), UpcycleConfig(num_experts=2, top_k=1, granularity=4, moe_layers=[0]))
    assert (logits(dense) - logits(moe)).abs().max().item() <= 1e-5


# ---- growing an MoE -----------------------------------------------------------------------------------------

@pytest.mark.parametrize('router_weights', ['renormalized', 'softmax'])
@pytest.mark.parametrize('g, m', [(1, 2), (2, 2), (1, 3)])
def test_grow_is_exact_without_scaling(dense, router_weights, g, m):
    """A trained MoE (experts and routers perturbed apart) grown m-fold, top-k x m: the same function."""
    cfg = mpt_cfg()
    src_block = UpcycleConfig(num_experts=4, top_k=2, granularity=g, router_weights=router_weights, moe_layers=2)
    source = upcycle(cfg, dense.state_dict(), src_block)
    with torch.no_grad():
        for name, p in source.named_parameters():
            if 'experts.mlp' in name or 'router' in name:
                p.add_(torch.randn_like(p) * p.std())
    grown = upcycle(cfg, source.state_dict(), UpcycleConfig.from_mapping({**src_block.to_mapping(), 'from': None,
                                                                           'grow': m}))
    assert grown.config.ffn_config['moe_num_experts'] == 4 * g * m
    assert grown.config.ffn_config['moe_top_k'] == 2 * g * m
    diff = (logits(source) - logits(grown)).abs().max().item()
    assert diff <= 1e-5, diff
    # a grow that does not raise top-k with the experts is not the same function
    with torch.no_grad():
        fewer_block = UpcycleConfig.from_mapping({**src_block.to_mapping(), 'from': None, 'grow': m, 'top_k': 1})
        fewer = build({**cfg, **moe_model_fields(cfg, fewer_block, 'torch')})
        fewer.load_state_dict(grown.state_dict())
    assert (logits(source) - logits(fewer)).abs().max().item() > 1e-3


def test_grow_refusals(dense):
    sd = dense.state_dict()
    with pytest.raises(ValueError, match=r'upcycle\.grow=2: block 0 of the checkpoint is dense'):
        upcycle_state_dict(sd, 4, grow=2)
    moe_sd = upcycle_state_dict(sd, 4)
    with pytest.raises(ValueError, match='already has a mixture-of-experts.*upcycle.grow'):
        upcycle_state_dict(moe_sd, 4)
    with pytest.raises(ValueError, match=r'has 4 experts, but upcycle\.num_experts x granularity = 8'):
        upcycle_state_dict(moe_sd, 8, grow=2)
    partial = upcycle_state_dict(sd, 4, moe_layers=[1])
    with pytest.raises(ValueError, match='block 0 of the checkpoint is dense'):
        upcycle_state_dict(partial, 4, grow=2)
    with pytest.raises(ValueError, match='block 1 is a mixture of experts in the checkpoint but stays dense'):
        upcycle_state_dict(partial, 4, grow=2, moe_layers=[2])


# ---- Drop-Upcycling ------------------------------------------------------------------------------------------

def _expert_rows(w: torch.Tensor, e: int, rows: int) -> torch.Tensor:
    return w[e * rows:(e + 1) * rows]


@pytest.mark.parametrize('ratio', [0.5, 0.25, 1.0])
def test_drop_upcycling_redraws_a_fraction_per_expert_with_the_dense_statistics(dense, ratio):
    E, F = 8, 160
    sd = dense.state_dict()
    moe = upcycle_state_dict(sd, E, drop_ratio=ratio, seed=5)
    n = math.floor(ratio * F)
    dropped = {}
    for layer in range(L):
        pre = f'model.transformer.blocks.{layer}.ffn.'
        mats = {'w1': sd[pre + 'gate_proj.weight'], 'v1': sd[pre + 'up_proj.weight'],
                'w2': sd[pre + 'down_proj.weight'].t()}
        for name, src in mats.items():
            w = moe[pre + 'experts.mlp.' + name]
            redrawn = []
            for e in range(E):
                x = _expert_rows(w, e, F)
                changed = (x != src).any(dim=1).nonzero().flatten().tolist()
                assert len(changed) == n, (layer, name, e, len(changed))          # the fraction, per expert
                assert torch.equal(x[~(x != src).any(dim=1)], src[~(x != src).any(dim=1)])  # the rest are copies
                dropped.setdefault((layer, e), set(changed))
                assert set(changed) == dropped[(layer, e)], 'gate, up and down must re-draw the same neurons'
                redrawn.append(x[changed])
            if redrawn:
                redrawn = torch.cat(redrawn)
                # N(mean, std) of the whole dense matrix: mean within 4 standard errors, std within 5%
                se = src.std().item() / math.sqrt(redrawn.numel())
                assert abs(redrawn.mean().item() - src.mean().item()) < 4 * se + 1e-7
                assert redrawn.std().item() == pytest.approx(src.std().item(), rel=0.05)
    subsets = [frozenset(dropped[(0, e)]) for e in range(E)]
    if ratio < 1:
        assert len(set(subsets)) == E, 'each expert must re-draw its own subset'
        assert len(set(frozenset(dropped[(i, 0)]) for i in range(L))) == L, 'and each layer its own'
    assert torch.equal(dropped_rows(UpcycleWeights(E, drop_ratio=ratio, seed=5), 0, 3, F).sort().values,
                       torch.tensor(sorted(dropped[(0, 3)])))


def test_drop_upcycling_is_not_exact_and_seeded(dense):
    cfg = mpt_cfg()
    moe = upcycle(cfg, dense.state_dict(), UpcycleConfig(num_experts=4, top_k=2, drop_ratio=0.5))
    assert (logits(dense) - logits(moe)).abs().max().item() > 1e-2
    a, b, c = (upcycle_state_dict(dense.state_dict(), 4, drop_ratio=0.5, seed=s)['model.transformer.blocks.0.ffn.'
                                                                                  'experts.mlp.w1'] for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---- the block: validation by key, before any training ---------------------------------------------------------

@pytest.mark.parametrize('block, match', [
    ({'drop_ratio': 1.5}, r'upcycle\.drop_ratio'),
    ({'drop_ratio': 'half'}, r'upcycle\.drop_ratio'),
    ({'granularity': 0}, r'upcycle\.granularity'),
    ({'granularity': 1.5}, r'upcycle\.granularity'),
    ({'grow': 0}, r'upcycle\.grow'),
    ({'grow': 2, 'drop_ratio': 0.5}, r'upcycle\.drop_ratio: must be 0 with grow=2'),
    ({'grow': 2, 'expert_noise_std': 0.1}, r'upcycle\.expert_noise_std: must be 0 with grow=2'),
    ({'moe_layers': 0}, r'upcycle\.moe_layers'),
    ({'moe_layers': []}, r'upcycle\.moe_layers'),
    ({'moe_layers': [1, 1]}, r'upcycle\.moe_layers'),
    ({'moe_layers': [-1]}, r'upcycle\.moe_layers'),
    ({'moe_layers': True}, r'upcycle\.moe_layers'),
    ({'granular': 2}, r"unknown key\(s\) \['granular'\]"),
])
def test_bad_variant_values_are_refused_by_key(block, match):
    with pytest.raises(ValueError, match=match):
        UpcycleConfig.from_mapping(block)


@pytest.mark.parametrize('block, match', [
    ({'granularity': 3}, r'upcycle\.granularity=3 must divide the dense FFN width 160'),
    ({'moe_layers': [0, 4]}, r'upcycle\.moe_layers: block\(s\) \[4\] do not exist'),
])
def test_bad_variant_values_are_refused_against_the_model(block, match):
    with pytest.raises(ValueError, match=match):
        moe_model_fields(mpt_cfg(), UpcycleConfig.from_mapping(block), 'torch')


def test_block_fields_and_loader_entry():
    from foundry_upcycle.transforms import expand
    cfg = {'model': {'name': 'mpt_causal_lm', **mpt_cfg()}, 'load_path': __file__, 'callbacks': {}}
    out = expand(copy.deepcopy(cfg), UpcycleConfig(num_experts=4, granularity=2, moe_layers=[1, 3], drop_ratio=0.25))
    model = out['model']
    assert model['moe_layers'] == [1, 3] and model['dense_ffn_config'] == cfg['model']['ffn_config']
    assert model['expert_granularity'] == 2 and model['ffn_config']['ffn_hidden_size'] == 80
    entry = out['callbacks']['upcycle_loader']
    assert entry['granularity'] == 2 and entry['moe_layers'] == [1, 3] and entry['drop_ratio'] == 0.25
    assert UpcycleWeights.from_mapping({k: v for k, v in entry.items() if k not in ('source', 'autoresume')})
    plain = expand(copy.deepcopy(cfg), UpcycleConfig(num_experts=4, moe_layers=1))
    assert 'moe_layers' not in plain['model'] and 'granularity' not in plain['callbacks']['upcycle_loader']


# ---- parameter and FLOP accounting ------------------------------------------------------------------------------

VARIANTS = {
    'paper': {},
    'granular2': {'granularity': 2},
    'granular4_top1': {'granularity': 4, 'top_k': 1},
    'every2': {'moe_layers': 2},
    'list13_granular2': {'moe_layers': [1, 3], 'granularity': 2},
    'drop0.5': {'drop_ratio': 0.5},
    'grow2': {'grow': 2},
}


def _block(variant) -> UpcycleConfig:
    return UpcycleConfig(**{'num_experts': 4, 'top_k': 2, **variant})


@pytest.mark.parametrize('name', sorted(VARIANTS))
def test_counter_matches_the_built_model(name):
    """The one counter (shapes.ParamCount via study.flops) against the parameters foundry builds, per variant."""
    from foundry_upcycle.study.flops import param_breakdown
    cfg = mpt_cfg()
    model_cfg = {**cfg, **moe_model_fields(cfg, _block(VARIANTS[name]), 'torch')}
    model = build(model_cfg)
    b = param_breakdown(model_cfg)
    assert b.total == sum(p.numel() for p in model.parameters())
    ffn = sum(p.numel() for n, p in model.named_parameters() if '.experts.mlp.' in n)
    moe_blocks = model._num_routers
    experts, top_k = model_cfg['ffn_config']['moe_num_experts'], model_cfg['ffn_config']['moe_top_k']
    assert b.total - b.active == ffn * (experts - top_k) // experts
    assert b.moe_layers == moe_blocks


def test_flops_and_token_ratio_per_variant():
    from foundry_upcycle.study.flops import param_counts, token_ratio, train_flops_per_token
    cfg = mpt_cfg()
    moe = {n: {**cfg, **moe_model_fields(cfg, _block(v), 'torch')}
           for n, v in VARIANTS.items()}
    fpt = {n: train_flops_per_token(m, 32) for n, m in moe.items()}
    paper_total, paper_active = param_counts(moe['paper'])
    # fine-grained: the same expert parameters (k copies' width active); only the router grows (E*G rows)
    total, active = param_counts(moe['granular2'])
    assert total - paper_total == active - paper_active == L * 4 * D
    assert fpt['granular2'] - fpt['paper'] == 6 * L * 4 * D
    assert param_counts(moe['drop0.5']) == (paper_total, paper_active) and fpt['drop0.5'] == fpt['paper']
    # MoE on every other block: halfway between dense and the paper's MoE
    dense_total, dense_active = param_counts(cfg)
    t2, a2 = param_counts(moe['every2'])
    assert t2 - dense_total == (paper_total - dense_total) // 2 and a2 - dense_active == (paper_active - dense_active) // 2
    assert 1 > token_ratio(cfg, moe['every2'], 32) > token_ratio(cfg, moe['paper'], 32)
    # grow x2: twice the experts, twice the active width
    tg, ag = param_counts(moe['grow2'])
    ffn_active = 3 * 160 * D * 2 * L
    assert ag - paper_active == ffn_active + L * 4 * D and tg - paper_total == 2 * ffn_active + L * 4 * D
    assert token_ratio(cfg, moe['grow2'], 32) < token_ratio(cfg, moe['paper'], 32)
