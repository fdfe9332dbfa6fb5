"""`foundry-upcycle study --variants`: each variant an arm at matched FLOPs (its own token count from the one FLOP
counter), compared against CPT and against the paper's recipe, in the report's variants table."""
from __future__ import annotations

import copy
import math

import pytest

from foundry_upcycle.study import arms
from foundry_upcycle.study import pipeline as P
from foundry_upcycle.study.config import StudyConfig
from foundry_upcycle.study.verdicts import comparisons
from test_report import synthetic_results

VARIANTS = 'paper,drop0.5,granular2,every2'


def test_variant_names_become_arms_and_bad_ones_are_refused():
    assert arms.variant_arms(VARIANTS) == ('cpt', 'upcycle', 'drop0.5', 'granular2', 'every2')
    assert arms.get('granular2').upcycle == {'granularity': 2} and arms.get('every3').upcycle == {'moe_layers': 3}
    for bad, match in (('drop1.5', r'upcycle\.drop_ratio'), ('granular0', r'upcycle\.granularity'),
                       ('shuffle2', "arm 'shuffle2' is not known"), ('cpt', 'CPT is always the baseline')):
        with pytest.raises(ValueError, match=match):
            arms.variant_arms(bad)


def test_cli_variants(tmp_path, capsys):
    from foundry_upcycle.cli import build_parser
    from foundry_upcycle.study.cli import config_from_args
    args = build_parser().parse_args(['study', '--variants', VARIANTS, '--out', str(tmp_path)])
    assert config_from_args(args).arms == ('cpt', 'upcycle', 'drop0.5', 'granular2', 'every2')
    from foundry_upcycle.cli import main
    assert main(['study', '--variants', 'paper,granular3x', '--out', str(tmp_path / 'x')]) == 2
    assert "arm 'granular3x' is not known" in capsys.readouterr().err


def test_every_variant_trains_at_the_matched_flops():
    plan = P.Study(StudyConfig(arms=arms.variant_arms(VARIANTS))).make_plan()
    assert plan.blocks['granular2']['granularity'] == 2 and plan.blocks['drop0.5']['drop_ratio'] == 0.5
    assert plan.models['every2']['moe_layers'] == [0] and plan.models['granular2']['ffn_config']['moe_top_k'] == 4
    for b in sorted({b for _, b in plan.steps}):
        budget = b * plan.pretrain_tokens * plan.flops['cpt']
        for arm in plan.arms:
            spent = plan.target_tokens[(arm, b)] * plan.flops[arm]
            assert budget - plan.flops[arm] < spent <= budget * (1 + 1e-12), (arm, b)
    # the same active parameters as the paper's recipe (+ the router's extra rows for granular2); every2: fewer
    assert plan.flops['drop0.5'] == plan.flops['upcycle'] < plan.flops['granular2'] < plan.flops['upcycle'] * 1.01
    assert plan.flops['cpt'] < plan.flops['every2'] < plan.flops['upcycle']
    assert plan.params['drop0.5'] == plan.params['upcycle']


def _with_variant(results: dict, name: str, shift: float) -> dict:
    out = copy.deepcopy(results)
    for entry in results['arms']:
        if entry['arm'] == 'upcycle':
            v = copy.deepcopy(entry)
            v['arm'] = name
            v['eval']['ce_domain'] += shift
            for s in v['per_seed']:
                s['eval']['ce_domain'] += shift
                units = s['eval']['heldout']['domain']['units']         # per document: [nll sum, tokens]
                s['eval']['heldout']['domain']['units'] = [[nll + shift * t, t] for nll, t in units]
            out['arms'].append(v)
    out['lr'][name] = out['lr']['upcycle']                          # a real study chooses every arm's lr
    names = ('cpt', 'upcycle', name)
    out['config']['arms'] = list(names)
    sets = out.get('eval_sets')
    out['comparisons'] = comparisons(out['arms'], out['budgets'], names, sets)
    out['comparisons_vs_paper'] = comparisons(out['arms'], out['budgets'], names[1:], sets, base='upcycle')
    return out


def test_report_tables_each_variant_against_cpt_and_the_paper(tmp_path):
    from foundry_upcycle.study import report as R
    results = _with_variant(synthetic_results(), 'drop0.5', -0.05)
    c = results['comparisons_vs_paper']['drop0.5']['1']['ce_domain']
    assert c['baseline'] == 'upcycle' and math.isclose(c['gap'], -0.05, abs_tol=1e-9) and c['winner'] == 'drop0.5'
    text = R.write_report(results, tmp_path).read_text()
    assert "## Upcycling variants: each against CPT and against the paper's recipe" in text
    lo, hi = c['ci']
    row = next(line for line in text.splitlines() if line.startswith('| 1 | Drop-Upcycling r=0.5 |'))
    assert f'{c["gap"]:+.4f} [{lo:+.4f}, {hi:+.4f}] drop0.5 ahead' in row
    assert '| 1 | upcycled (MoE) |' in text and '(reference)' in text
    assert '![Drop-Upcycling r=0.5](router_drop0.5.png)' in text
    assert (tmp_path / 'router_drop0.5.png').read_bytes().startswith(b'\x89PNG')
    plain = R.write_report(synthetic_results(), tmp_path / 'plain').read_text()
    assert 'Upcycling variants' not in plain
