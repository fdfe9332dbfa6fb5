"""The typed `upcycle:` block and the config transform (no training)."""
from __future__ import annotations

import logging

import pytest

from foundry_upcycle.config import UpcycleConfig, moe_ffn_config
from foundry_upcycle.transforms import apply_upcycle_block

DENSE = {'name': 'mpt_causal_lm', 'd_model': 64, 'no_bias': True, 'expansion_ratio': 2.5,
         'ffn_config': {'ffn_type': 'mptglu', 'ffn_act_fn': {'name': 'silu'}}}


def recipe(tmp_path, block=None, **top):
    ckpt = tmp_path / 'dense.pt'
    ckpt.write_bytes(b'x')
    cfg = {'model': {**DENSE, 'ffn_config': dict(DENSE['ffn_config'])}, 'load_path': str(ckpt),
           'load_weights_only': True, 'precision': 'fp32', 'optimizer': {'name': 'decoupled_adamw', 'lr': 1e-3, 'weight_decay': 5e-5}}
    cfg.update(top)
    if block is not None:
        cfg['upcycle'] = block
    return cfg


def test_defaults_follow_the_paper():
    c = UpcycleConfig.from_mapping({})
    assert (c.num_experts, c.top_k, c.load_balancing_loss_weight, c.expert_noise_std) == (8, 2, 0.01, 0.0)
    assert UpcycleConfig.from_mapping({'from': 'a.pt'}).to_mapping()['from'] == 'a.pt'


@pytest.mark.parametrize('block, key', [
    ({'experts': 4}, 'experts'),
    ({'num_experts': 1}, 'num_experts'),
    ({'num_experts': 4, 'top_k': 5}, 'top_k'),
    ({'top_k': 0}, 'top_k'),
    ({'num_experts': True}, 'num_experts'),
    ({'router_init_std': 0}, 'router_init_std'),
    ({'load_balancing_loss_weight': -1}, 'load_balancing_loss_weight'),
    ({'backend': 'cuda'}, 'backend'),
    ({'lr': -1}, 'lr'),
    ({'num_experts': 8, 'moe_world_size': 3}, 'moe_world_size'),
])
def test_bad_block_names_the_key(block, key):
    with pytest.raises(ValueError, match=key):
        UpcycleConfig.from_mapping(block)


def test_moe_ffn_config_is_exact_and_complete():
    ffn = moe_ffn_config(DENSE, UpcycleConfig(num_experts=4, top_k=1), 'torch')
    assert ffn == {'ffn_type': 'torch_dmoe', 'ffn_hidden_size': 160, 'ffn_act_fn': {'name': 'silu'}, 'mlp_type': 'glu',
                   'moe_num_experts': 4, 'moe_top_k': 1, 'moe_normalize_expert_weights': 1, 'moe_jitter_eps': None,
                   'uniform_expert_assignment': False}
    mb = moe_ffn_config(DENSE, UpcycleConfig(num_experts=4, moe_world_size=2), 'megablocks')
    assert mb['ffn_type'] == 'mb_dmoe' and mb['mlp_impl'] == 'grouped' and mb['moe_world_size'] == 2
    assert mb['moe_loss_weight'] == 0.01
    # MPT's default exact GELU is made explicit (megablocks would default to tanh-GELU).
    plain = moe_ffn_config({**DENSE, 'ffn_config': {'ffn_type': 'mptmlp'}}, UpcycleConfig(), 'torch')
    assert plain['mlp_type'] == 'mlp' and plain['ffn_act_fn'] == {'name': 'gelu', 'approximate': 'none'}


@pytest.mark.parametrize('model_patch, match', [
    ({'no_bias': False}, 'no_bias'),
    ({'ffn_config': {'ffn_type': 'torch_dmoe'}}, 'already a mixture of experts'),
    ({'ffn_config': {'ffn_type': 'te_ln_mlp'}}, 'te_ln_mlp'),
    ({'ffn_config': {'ffn_type': 'mptglu', 'moe_num_experts': 4}}, 'moe_num_experts'),
    ({'ffn_config': {'ffn_type': 'mptglu', 'moe_jitter_eps': 0.01}}, 'moe_jitter_eps'),
])
def test_contradicting_model_config_is_refused(model_patch, match):
    with pytest.raises(ValueError, match=match):
        moe_ffn_config({**DENSE, **model_patch}, UpcycleConfig(), 'torch')


def test_transform_is_a_noop_without_the_block(tmp_path):
    cfg = recipe(tmp_path)
    assert apply_upcycle_block(cfg) is cfg


def test_transform_expands_the_block(tmp_path, caplog):
    cfg = recipe(tmp_path, {'num_experts': 4, 'top_k': 2, 'lr': 2e-3, 'seed': 3})
    with caplog.at_level(logging.WARNING):
        out = apply_upcycle_block(cfg)
    assert 'upcycle' in cfg, 'the input config must not be mutated'
    assert 'upcycle' not in out and 'load_path' not in out and 'load_weights_only' not in out
    assert out['model']['name'] == 'mpt_upcycle_causal_lm'
    assert out['model']['ffn_config']['ffn_type'] == 'torch_dmoe'  # fp32 recipe: never mb_dmoe, GPU or not
    assert 'using torch_dmoe instead of mb_dmoe because precision=fp32' in caplog.text  # backend auto: never silent
    assert out['model']['load_balancing_loss_weight'] == 0.01
    assert out['callbacks']['upcycle_loader'] == {'source': cfg['load_path'], 'num_experts': 4,
                                                  'router_init_std': 0.02, 'seed': 3, 'expert_noise_std': 0.0,
                                                  'autoresume': bool(cfg.get('autoresume', False))}
    assert out['optimizer']['lr'] == 2e-3 and out['optimizer']['weight_decay'] == pytest.approx(1e-4)


def test_transform_torch_backend_is_quiet(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        apply_upcycle_block(recipe(tmp_path, {'backend': 'torch'}))
    assert 'instead of mb_dmoe' not in caplog.text


@pytest.mark.parametrize('block, top, match', [
    ({'from': '/nonexistent/dense.pt'}, {'load_path': None}, '/nonexistent/dense.pt does not exist'),
    ({'from': 'other.pt'}, {}, 'different checkpoints'),
    ({}, {'load_path': None}, 'upcycle.from: missing'),
    ({}, {'callbacks': {'upcycle_loader': {}}}, 'callbacks.upcycle_loader'),
    ({'lr': 1e-3}, {'optimizer': None}, 'optimizer'),
    ({}, {'model': {'name': 'hf_causal_lm'}}, 'model.name'),
])
def test_transform_errors_name_the_problem(tmp_path, block, top, match):
    cfg = recipe(tmp_path, block)
    cfg.update(top)
    with pytest.raises(ValueError, match=match):
        apply_upcycle_block(cfg)


def test_transform_refuses_a_directory(tmp_path):
    cfg = recipe(tmp_path, {'from': str(tmp_path)}, load_path=None)
    with pytest.raises(ValueError, match='is a directory'):
        apply_upcycle_block(cfg)
