"""The report from a synthetic results.json: files, the measured winner per budget, missing data, errors."""
from __future__ import annotations

import copy
import math
import random

import pytest

from foundry_upcycle.study import report as R

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def synthetic_results(budgets=(0.25, 0.5, 1.0)) -> dict:
    """Upcycling wins domain CE at the two larger budgets and loses at the smallest (as built here)."""
    rng = random.Random(0)
    arms = []
    for b in budgets:
        for arm in ('cpt', 'upcycle'):
            steps = int(200 * b) if arm == 'cpt' else int(150 * b)
            moe = arm == 'upcycle'
            ce_domain = {('cpt', 0.25): 3.30, ('upcycle', 0.25): 3.35}.get((arm, b), 3.2 - 0.2 * b - 0.1 * moe)
            core = 0.02 + 0.03 * b + (0.01 if arm == 'upcycle' else 0)
            curve = [[s, 4.0 * math.exp(-s / 80) + 3.0 + rng.uniform(-0.05, 0.05)] for s in range(1, steps + 1)]
            arms.append({
                'arm': arm, 'budget': b, 'tokens': steps * 1024, 'steps': steps, 'train_flops': steps * 1024 * 1e6,
                'flops_per_token': 1.3e6 if moe else 1.0e6, 'total_params': 3_500_000 if moe else 1_000_000,
                'active_params': 1_000_000 if arm == 'cpt' else 1_400_000, 'train_ce_last50': ce_domain - 0.1,
                'tokens_per_s': 2000.0 if arm == 'cpt' else 1500.0, 'step_time_s': 0.5 if arm == 'cpt' else 0.7,
                'eval': {'ce_generic': 3.6, 'ce_domain': ce_domain, 'core_average': core,
                         'tasks': {'copa': 0.5 + core, 'piqa': 0.52, 'lambada_openai': 0.01}},
                'loss_curve': curve,
            })
    return {
        'schema': 1, 'config': {'seed': 0, 'budgets': list(budgets)}, 'budgets': list(budgets), 'token_ratio': 1 / 1.3,
        'missing_eval_tasks': ['hellaswag', 'mmlu'],
        'dense': {'params': 1_000_000, 'flops_per_token': 1.0e6, 'pretrain_tokens': 300_000, 'pretrain_flops': 3e11,
                  'eval': {'ce_generic': 3.5, 'ce_domain': 3.5, 'core_average': 0.015, 'tasks': {'copa': 0.5}}},
        'arms': arms,
    }


def test_report_and_plots(tmp_path):
    results = synthetic_results()
    extra = '## Inference cost\n\nMoE serving is 42% slower (made-up section for the test).\n'
    path = R.write_report(results, tmp_path, extra_sections=[extra])
    text = path.read_text()
    for name in R.FIGURES.values():
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 20_000, name
        assert f']({name})' in text
    assert '- budget 0.25: **CPT (dense)** wins: 3.3500 (upcycled) vs 3.3000 (CPT)' in text
    assert '- budget 0.5: **upcycled (MoE)** wins' in text and '- budget 1: **upcycled (MoE)** wins' in text
    assert 'Upcycled won at 2, CPT at 1 of 3 budgets' in text
    assert 'token ratio at matched FLOPs: 0.769' in text
    assert 'hellaswag, mmlu' in text
    assert 'near chance level' in text and 'single training run' in text
    assert extra.strip() in text
    assert 'FLOP ratio of 1.30' in text and '1.40' in text          # step-time ratio 0.7 / 0.5
    assert not list(tmp_path.glob('.*tmp'))                           # atomic writes left no temp files


def test_winner_follows_the_data(tmp_path):
    results = synthetic_results()
    for a in results['arms']:                                         # flip: CPT now best everywhere
        if a['arm'] == 'cpt':
            a['eval']['ce_domain'] = 1.0
    text = R.write_report(results, tmp_path).read_text()
    assert 'Upcycled won at 0, CPT at 3 of 3 budgets' in text
    assert R.ce_winner(results, 0.5)[0] == 'cpt'


def test_missing_values_do_not_break_the_report(tmp_path):
    results = synthetic_results(budgets=(0.1, 0.2, 0.4, 0.8))
    results['arms'] = [a for a in results['arms'] if not (a['arm'] == 'upcycle' and a['budget'] == 0.8)]
    for a in results['arms']:
        a['eval']['core_average'] = None if a['budget'] == 0.1 else a['eval']['core_average']
        a.pop('loss_curve') if a['budget'] == 0.2 else None
    results['arms'][0]['eval']['core_average'] = -0.01             # CPT below chance: no relative gain
    results['missing_eval_tasks'] = []
    text = R.write_report(results, tmp_path).read_text()
    assert '- budget 0.8: not measured' in text and '(1 not measured)' in text
    assert 'No eval tasks were missing.' in text
    assert R.relative_gain(0.05, -0.01) is None and R.relative_gain(0.06, 0.05) == pytest.approx(20.0)
    assert (tmp_path / R.FIGURES['loss']).read_bytes().startswith(PNG_MAGIC)


def test_bad_results_are_clear_errors(tmp_path):
    good = synthetic_results()
    for mutate, match in [
        (lambda r: r.update(schema=2), 'results.schema'),
        (lambda r: r.update(budgets=[]), 'results.budgets'),
        (lambda r: r['arms'][0].update(arm='moe'), r'results.arms\[0\]'),
    ]:
        bad = copy.deepcopy(good)
        mutate(bad)
        with pytest.raises(ValueError, match=match):
            R.write_report(bad, tmp_path)
    with pytest.raises(ValueError, match='extra_sections'):
        R.write_report(good, tmp_path, extra_sections='## one string')
    (tmp_path / 'file').write_text('x')
    with pytest.raises(ValueError, match='not writable'):
        R.write_report(good, tmp_path / 'file' / 'report')
