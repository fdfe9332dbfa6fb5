"""Shipped recipes: each CPT/upcycle pair differs in exactly the `upcycle:` block, and every recipe expands.

Training coverage: yamls/hf/mixtral.yaml runs in test_import.py, yamls/hf/{cpt,upcycle}.yaml in test_hf_upcycle.py and test_real_model.py (with hf/eval.yaml); yamls/tiny/* run in test_train.py (pretrain via the dense_checkpoint fixture); the paper
shapes (436m, 1.4b) are built and stepped in test_study.py.
"""
from __future__ import annotations

import pytest

from conftest import YAMLS, load_recipe
from foundry_upcycle.transforms import apply_upcycle_block

PAIRS = sorted(p.parent.name for p in YAMLS.glob('*/upcycle.yaml'))
MPT_PAIRS = [p for p in PAIRS if p != 'hf']  # hf: tests/test_hf_upcycle.py


def test_every_yaml_is_known():
    shipped = sorted(str(p.relative_to(YAMLS)) for p in YAMLS.rglob('*.yaml'))
    expected = ['tiny/pretrain.yaml', 'hf/mixtral.yaml', 'hf/eval.yaml'] + [f'{d}/{arm}.yaml' for d in PAIRS
                                                            for arm in ('cpt', 'upcycle')]
    assert shipped == sorted(expected), 'a new recipe needs a test'
    assert PAIRS == ['1.4b', '436m', 'hf', 'tiny']


@pytest.mark.parametrize('shape', PAIRS)
def test_pair_differs_only_in_the_upcycle_block(shape):
    cpt, up = load_recipe(f'{shape}/cpt.yaml'), load_recipe(f'{shape}/upcycle.yaml')
    assert 'upcycle' not in cpt and isinstance(up.pop('upcycle'), dict)
    assert up == cpt


@pytest.mark.parametrize('shape', MPT_PAIRS)
def test_upcycle_recipe_expands(shape, tmp_path):
    from omegaconf import OmegaConf as om
    dense = tmp_path / 'dense.pt'
    dense.write_bytes(b'')
    cfg = om.merge(om.load(YAMLS / shape / 'upcycle.yaml'),
                   om.create({'variables': {'dense_checkpoint': str(dense), 'save_folder': str(tmp_path / 's'),
                                            'run_name': 'r'}}))
    out = apply_upcycle_block(om.to_container(cfg, resolve=True))
    ffn = out['model']['ffn_config']
    assert out['model']['name'] == 'mpt_upcycle_causal_lm' and ffn['ffn_type'] == 'torch_dmoe'  # CPU fallback
    assert (ffn['moe_num_experts'], ffn['moe_top_k']) == (8, 2)
    assert out['callbacks']['upcycle_loader']['source'] == str(dense) and 'load_path' not in out
    if shape == '436m':  # the paper's upcycling lr at 436M is twice CPT's; decoupled decay scales with it
        assert out['optimizer']['lr'] == 1e-4 and out['optimizer']['weight_decay'] == pytest.approx(5e-6)
