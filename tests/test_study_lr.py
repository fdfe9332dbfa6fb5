"""Arms tuned alike: the lr sweep brackets each arm's optimum on the validation split (extending an edge), is checked
at the largest budget, and both arms' lrs set the optimizer by one rule; at 436M the upcycled run's weight decay
after `expand` equals the shipped recipe's."""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf as om

from foundry_upcycle.study import lr_select
from foundry_upcycle.study.config import REPO, StudyConfig
from foundry_upcycle.study.recipes import RunBuilder
from foundry_upcycle.transforms import apply_upcycle_block


class FakeStudy:
    """Just enough of a Study for lr_select: validation CE = a parabola in log lr around each arm's optimum, which
    moves up with the budget (as measured in docs/lr_sweep.md)."""

    def __init__(self, cfg: StudyConfig, optimum: dict[str, float]):
        self.cfg, self.optimum, self.trained = cfg, optimum, []
        self.progress = SimpleNamespace(say=lambda msg: None)

    def ce(self, arm: str, budget: float, lr: float) -> float:
        best = self.optimum[arm] * (budget / min(self.cfg.budgets)) ** 0.5
        return 3.0 + 0.01 * math.log(lr / best) ** 2

    def train_arms(self, keys, dense, icl):
        self.trained += list(keys)

    def stage_arm(self, arm, budget, dense, seed_index, lr):
        return SimpleNamespace(key=(arm, budget, seed_index, lr))

    def stage_eval(self, name, stage, icl=True):
        arm, budget, _, lr = stage.key
        return SimpleNamespace(outputs={'ce_domain_val': self.ce(arm, budget, lr)})


def test_the_sweep_extends_an_edge_until_the_optimum_is_bracketed():
    cfg = StudyConfig(budgets=(0.1, 0.4), lr_sweep=(1e-3, 2e-3, 4e-3), lr_extend=2)
    study = FakeStudy(cfg, {'cpt': 7e-3, 'upcycle': 2.1e-3})
    sweep = lr_select.select_lrs(study, dense=None)
    assert sweep['split'] == 'validation' and sweep['metric'] == 'ce_domain_val' and sweep['budget'] == 0.1
    assert sweep['grids']['upcycle'] == [1e-3, 2e-3, 4e-3] and sweep['chosen']['upcycle'] == 2e-3
    assert sweep['grids']['cpt'] == pytest.approx([1e-3, 2e-3, 4e-3, 8e-3, 16e-3])   # extended twice: 8e-3 interior
    assert sweep['chosen']['cpt'] == pytest.approx(8e-3) and sweep['at_edge'] == []
    assert all(k[1] == 0.1 and k[2] == 0 for k in study.trained)                    # shortest budget, seed 0
    # one extension allowed: still at the edge, and said so
    edge = lr_select.select_lrs(FakeStudy(cfg.replace(lr_extend=1), {'cpt': 20e-3, 'upcycle': 2e-3}), None)
    assert edge['at_edge'] == ['cpt'] and edge['chosen']['cpt'] == pytest.approx(8e-3)


def test_the_choice_is_checked_at_the_largest_budget():
    cfg = StudyConfig(budgets=(0.1, 0.4), lr_sweep=(1e-3, 2e-3, 4e-3, 8e-3), lr_check='both')
    study = FakeStudy(cfg, {'cpt': 2e-3, 'upcycle': 2e-3})
    sweep = lr_select.select_lrs(study, None)
    keys = lr_select.check_keys(study, sweep)
    assert sorted(keys) == [('cpt', 0.4, 0, 1e-3), ('cpt', 0.4, 0, 4e-3), ('upcycle', 0.4, 0, 1e-3),
                            ('upcycle', 0.4, 0, 4e-3)]
    check = lr_select.check_at_top(study, sweep, None)
    # the optimum doubles with 4x the budget (2e-3 -> 4e-3): the check sees the shortest-budget choice under-tune
    assert check['best'] == {'cpt': 4e-3, 'upcycle': 4e-3} and check['chosen_cost']['cpt'] > 0
    assert lr_select.check_keys(study.__class__(cfg.replace(lr_check='off'), study.optimum), sweep) == []
    up = lr_select.check_keys(study.__class__(cfg.replace(lr_check='up'), study.optimum), sweep)
    assert sorted(up) == [('cpt', 0.4, 0, 4e-3), ('upcycle', 0.4, 0, 4e-3)]            # the default: one step up
    assert lr_select.neighbours([1e-3, 2e-3], 2e-3, 'up') == [4e-3]                      # past the top of the grid


def _builder(scale: str, tmp_path: Path) -> RunBuilder:
    dense = tmp_path / 'dense.pt'
    dense.write_bytes(b'not read here')
    (tmp_path / 'mds' / 'val').mkdir(parents=True)
    cfg = StudyConfig(scale=scale, mds_dir=str(tmp_path / 'mds'), tokenizer=str(tmp_path / 'tok'),
                      dense_checkpoint=str(dense), pretrain_tokens=10**9) if scale != 'tiny' else StudyConfig()
    return RunBuilder(cfg, nproc=1)


def _expanded(builder: RunBuilder, arm: str, lr: float, tmp_path: Path) -> dict:
    spec = builder.spec(arm, 10, 'x', str(tmp_path / 'dense.pt'), 0, lr)
    return apply_upcycle_block(builder.resolve(spec, tmp_path / 'work'))


def test_the_436m_upcycled_recipe_keeps_its_weight_decay_after_expand(tmp_path):
    """The study sets the upcycled lr in one place (the upcycle block), so `expand` rescales the decoupled weight
    decay with it: the study's run trains with the shipped recipe's lr AND decay (1e-4 and 5e-6 at 436M)."""
    raw = om.load(REPO / 'yamls' / '436m' / 'upcycle.yaml')
    builder = _builder('436m', tmp_path)
    required = {k: str(tmp_path / k) for k, v in om.to_container(raw.variables, resolve=False).items() if v == '???'}
    required['dense_checkpoint'] = str(tmp_path / 'dense.pt')
    shipped = om.to_container(om.merge(raw, {'variables': required}), resolve=True)
    shipped_opt = apply_upcycle_block(shipped)['optimizer']
    plan_lr = float(shipped['upcycle']['lr'])
    study_opt = _expanded(builder, 'upcycle', plan_lr, tmp_path)['optimizer']
    assert study_opt['lr'] == shipped_opt['lr'] == 1e-4
    assert study_opt['weight_decay'] == pytest.approx(shipped_opt['weight_decay']) == pytest.approx(5e-6)


def test_both_arms_follow_one_lr_rule(tmp_path):
    """At any lr, the CPT and upcycled runs train with the same lr and the same (coupled) weight decay."""
    builder = _builder('tiny', tmp_path)
    builder.cfg = builder.cfg.replace(data=builder.cfg.data)
    for lr in (1.4e-3, 2.8e-3, 1.12e-2):
        cpt = builder.resolve(builder.spec('cpt', 10, 'x', '<dense>', 0, lr), placeholders=True)['optimizer']
        up = _expanded(builder, 'upcycle', lr, tmp_path)['optimizer']
        assert cpt['lr'] == up['lr'] == lr
        assert cpt['weight_decay'] == pytest.approx(up['weight_decay']) == pytest.approx(5e-5 * lr / 2.8e-3)
