"""The report from a synthetic results.json (schema 3): files, the paired verdict per budget (with its interval and
test), the lr table, the regime, router health from jsonl-logged metrics, timing flags, missing data, errors."""
from __future__ import annotations

import copy
import json
import math
import random

import pytest

from foundry_upcycle.study import figures as F
from foundry_upcycle.study import report as R
from foundry_upcycle.study import results as RS
from foundry_upcycle.study import stats
from foundry_upcycle.study.training import router_curves, tail_window

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def router_series(steps: int, layers: int = 2, experts: int = 4) -> dict:
    """What training.router_curves reads back from the `upcycle_router_monitor` callback's jsonl lines."""
    rows = []
    for s in range(0, steps, 5):
        for i in range(layers):
            load = [1.0 + (e == 1) * s / steps for e in range(experts)]
            for e in range(experts):
                rows.append({'batch': s, 'key': f'router/layer{i}/load/expert{e}', 'value': load[e] / sum(load)})
            rows += [{'batch': s, 'key': f'router/layer{i}/entropy', 'value': math.log(experts) - 0.01 * s / steps},
                     {'batch': s, 'key': f'router/layer{i}/expert_spread', 'value': 0.001 * s},
                     {'batch': s, 'key': f'router/layer{i}/lbl', 'value': 1.0 + 0.01 * i}]
        rows.append({'batch': s, 'key': 'router/lbl', 'value': 1.005})
    metrics: dict = {}
    for r in rows:
        metrics.setdefault(r['key'], []).append((r['batch'], r['value']))
    return router_curves(metrics)


DOCS = 40


def heldout(ce: float, rng: random.Random) -> dict:
    """Per-document [nll, tokens] of a held-out set whose token-weighted CE is `ce` (documents differ a little)."""
    tokens = [rng.randint(500, 900) for _ in range(DOCS)]
    effects = [rng.gauss(0, 0.002) for _ in range(DOCS)]
    shift = sum(e * t for e, t in zip(effects, tokens)) / sum(tokens)
    return {'units': [[(ce + e - shift) * t, t] for e, t in zip(effects, tokens)], 'unit': 'document'}


def synthetic_results(budgets=(0.25, 0.5, 1.0), seeds=3, noise=0.01, seeds_other=3) -> dict:
    """Upcycling ahead on domain CE at the two larger budgets, behind at the smallest (as built here)."""
    rng = random.Random(0)
    arms = []
    for b in budgets:
        for arm in ('cpt', 'upcycle'):
            steps = int(200 * b) if arm == 'cpt' else int(150 * b)
            moe = arm == 'upcycle'
            ce = {('cpt', 0.25): 3.30, ('upcycle', 0.25): 3.35}.get((arm, b), 3.2 - 0.2 * b - 0.1 * moe)
            core = 0.02 + 0.03 * b + (0.01 if moe else 0)
            n = seeds if b == max(budgets) else seeds_other
            per_seed = []
            for i in range(n):
                ce_i = ce + noise * (i - (n - 1) / 2) * (1 if moe else 0.3)
                ev = {'ce_generic': 3.6, 'ce_domain': ce_i, 'core_average': core,
                      'tasks': {'copa': 0.5 + core, 'piqa': 0.52}, 'icl_examples': {'copa': 100, 'piqa': 300},
                      'heldout': {'domain': heldout(ce_i, random.Random(f'{b}{i}{arm}')),
                                  'generic': heldout(3.6, random.Random(f'{b}{i}{arm}g'))}}
                per_seed.append({'seed': 17 + i, 'eval': ev, 'train_ce_final': ce - 0.1,
                                 'core_average_binomial_se': 0.03, 'tokens_per_s': 2000.0, 'step_time_s': 0.5,
                                 'train_seconds': 10.0})
            mean = {k: stats.summary([s['eval'].get(k) for s in per_seed]) for k in RS.EVAL_METRICS}
            curve = [[s, 4.0 * math.exp(-s / 80) + 3.0 + rng.uniform(-0.05, 0.05)] for s in range(1, steps + 1)]
            entry = {
                'arm': arm, 'budget': b, 'lr': 1e-3, 'n_seeds': n, 'tokens': steps * 1024, 'train_tokens': steps * 1024,
                'steps': steps, 'train_flops': steps * 1024 * 1e6, 'flops_per_token': 1.3e6 if moe else 1.0e6,
                'total_params': 3_500_000 if moe else 1_000_000, 'active_params': 1_400_000 if moe else 1_000_000,
                'train_ce_final': ce - 0.1, 'train_ce_window': tail_window(steps),
                'tokens_per_s': 2000.0 if arm == 'cpt' else 1500.0, 'step_time_s': 0.5 if arm == 'cpt' else 0.7,
                'train_seconds': 10.0, 'core_average_binomial_se': 0.03 / math.sqrt(n),
                'eval': {**per_seed[0]['eval'], **{k: v['mean'] for k, v in mean.items()}},
                'eval_std': {k: v['std'] for k, v in mean.items() if v['std'] is not None},
                'eval_sem': {k: v['sem'] for k, v in mean.items() if v['sem'] is not None},
                'per_seed': per_seed, 'loss_curve': curve,
            }
            if moe:
                entry['router'] = router_series(steps)
            arms.append(entry)
    dense = {'params': 1_000_000, 'flops_per_token': 1.0e6, 'pretrain_tokens': 64_000_000,
             'pretrain_flops': 6.4e13, 'pretrain_lr': 3e-3,
             'eval': {'ce_generic': 3.5, 'ce_domain': 3.5, 'core_average': 0.015, 'tasks': {'copa': 0.5}}}
    lrs = {'cpt': 1e-3, 'upcycle': 1e-3}
    sets = {'domain': {'split': 'test', 'unit': 'document', 'documents': DOCS,
                       'clusters': [f'f{k // 2}' for k in range(DOCS)]},
            'generic': {'split': 'test', 'unit': 'document', 'documents': DOCS, 'clusters': None}}
    return {
        'schema': 3, 'config': {'seed': 0, 'budgets': list(budgets), 'data': {'eval_doc_chars': 2000}},
        'budgets': list(budgets), 'token_ratio': 1 / 1.3, 'eval_sets': sets,
        'missing_eval_tasks': ['hellaswag', 'mmlu'], 'dense': dense, 'arms': arms,
        'comparisons': RS.comparisons(arms, list(budgets), ('cpt', 'upcycle'), sets),
        'regime': RS.regime(dense, arms, 512, 3e-3, lrs),
        'lr': {**lrs, 'source': 'sweep on validation', 'sweep': {
            'budget': min(budgets), 'seed_index': 0, 'metric': 'ce_domain_val', 'split': 'validation',
            'grids': {'cpt': [5e-4, 1e-3, 2e-3], 'upcycle': [5e-4, 1e-3, 2e-3, 4e-3]},
            'scores': {'cpt': [[5e-4, 3.4], [1e-3, 3.3], [2e-3, 3.32]],
                       'upcycle': [[5e-4, 3.5], [1e-3, 3.35], [2e-3, 3.36], [4e-3, 3.4]]},
            'chosen': lrs, 'at_edge': [],
            'check': {'budget': max(budgets), 'seed_index': 0, 'best': {'cpt': 2e-3, 'upcycle': 1e-3},
                      'scores': {'cpt': [[5e-4, 3.1], [1e-3, 3.05], [2e-3, 3.04]],
                                 'upcycle': [[5e-4, 3.0], [1e-3, 2.95], [2e-3, 2.97]]},
                      'chosen_cost': {'cpt': 0.01, 'upcycle': 0.0}}}},
        'train_ce_definition': 'mean training CE over the last 5% of a run\'s steps (at least 10)',
        'timing': {'step_time_s': {'cpt': 0.5, 'upcycle': 0.7}, 'ratio': 1.4,
                   'steps_s': {'cpt': [0.5] * 6, 'upcycle': [0.7] * 6}, 'method': 'interleaved',
                   'load_average_before': [3.5, 3.0, 2.0], 'load_average_after': [3.6, 3.0, 2.0], 'cpu_count': 2,
                   'loaded': True},
    }


def test_report_and_plots(tmp_path):
    results = synthetic_results()
    extra = '## Inference cost\n\nMoE serving is 42% slower (made-up section for the test).\n'
    path = R.write_report(results, tmp_path, extra_sections=[extra])
    text = path.read_text()
    for name in list(R.FIGURES.values()) + [R.ROUTER_FIGURE]:
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 20_000, name
        assert f']({name})' in text
    assert '- budget 1: **upcycling** ahead: 2.9000 (upcycling) vs 3.0000 (CPT), gap -0.1000, 95% CI [' in text
    assert '- budget 0.25: **CPT** ahead' in text and '3 paired seeds, eval noise over 20 document clusters' in text
    assert 'upcycled (MoE) ahead at 2, CPT (dense) ahead at 1, tied at 0 of 3 budgets' in text
    assert 'false-positive rate is at most 5% at 2 and 3 seeds' in text
    assert 'the validation split chose the lrs; the test split chose nothing' in text
    assert '| 0.001 | **3.3000** | **3.3500** |' in text and '| 0.004 |  | 3.4000 |' in text     # the lr table
    assert 'an interior optimum of its grid' in text and 'under-tunes this arm at the largest' in text
    assert '## Forgetting: held-out generic cross-entropy (test split)' in text
    assert 'token ratio at matched FLOPs: 0.769' in text
    assert 'hellaswag, mmlu' in text and 'near chance' in text
    assert '**Regime: paper regime (over-trained base).**' in text and '| 64.0 | 100-460 |' in text
    assert extra.strip() in text
    assert '**1.40**' in text and 'FLOP ratio of 1.30' in text and 'machine was loaded' in text
    assert '2.9000 ± 0.0100' in text                                   # mean ± std over seeds
    assert not list(tmp_path.glob('.*tmp'))                           # atomic writes left no temp files


def test_a_gap_inside_its_interval_is_a_tie(tmp_path):
    results = synthetic_results(noise=0.2)                            # seed spread 0.2: the 0.1 gap is noise
    text = R.write_report(results, tmp_path).read_text()
    assert '- budget 1: tie: 2.9000 (upcycling) vs 3.0000 (CPT)' in text
    assert R.ce_winner(results, 1.0)[0] == 'tie'
    one_seed = synthetic_results(seeds=1, seeds_other=1)              # no seed spread anywhere: no verdict
    assert R.ce_winner(one_seed, 1.0)[0] == 'n/a' and 'no verdict (1 seed(s)' in R.ce_winner(one_seed, 1.0)[1]


def test_regime_says_when_the_run_does_not_test_the_paper(tmp_path):
    results = synthetic_results()
    results['dense'].update(pretrain_tokens=500_000, eval={'ce_domain': 6.2})    # 0.5 tokens/param, near ln 512
    results['regime'] = RS.regime(results['dense'], results['arms'], 512, 3e-3, {'cpt': 1e-3, 'upcycle': 4e-3})
    text = R.write_report(results, tmp_path).read_text()
    assert 'This run does NOT test the paper\'s claim' in text
    assert '0.5 tokens per parameter' in text and 'near chance on the domain' in text
    assert 'not below the pretraining peak 0.003' in text
    assert results['regime']['cpt_slope_per_doubling'] == pytest.approx(0.15)      # CE 3.30, 3.10, 3.00 per doubling


def test_missing_values_do_not_break_the_report(tmp_path):
    results = synthetic_results(budgets=(0.1, 0.2, 0.4, 0.8))
    results['arms'] = [a for a in results['arms'] if not (a['arm'] == 'upcycle' and a['budget'] == 0.8)]
    for a in results['arms']:
        a['eval']['core_average'] = None if a['budget'] == 0.1 else a['eval']['core_average']
        a.pop('loss_curve') if a['budget'] == 0.2 else None
        a.pop('router', None)
    results['arms'][0]['eval']['core_average'] = -0.01             # CPT below chance: no relative gain
    results['missing_eval_tasks'] = []
    results['timing'] = None
    results['comparisons'] = RS.comparisons(results['arms'], results['budgets'], ('cpt', 'upcycle'),
                                            results['eval_sets'])
    text = R.write_report(results, tmp_path).read_text()
    assert '- budget 0.8: not measured' in text and 'without a verdict)' in text
    assert 'No eval tasks were missing.' in text and 'No router metrics were logged' in text
    assert 'Step times were not measured' in text
    assert F.relative_gain(0.05, -0.01) is None and F.relative_gain(0.06, 0.05) == pytest.approx(20.0)
    assert (tmp_path / R.FIGURES['loss']).read_bytes().startswith(PNG_MAGIC)


def test_router_summary_reads_the_monitor_metrics():
    results = synthetic_results()
    s = R.router_summary(results)
    assert s['layers'] == [0, 1] and s['experts'] == [0, 1, 2, 3]
    for row in s['load']:
        assert sum(row) == pytest.approx(1.0) and max(row) == row[1]      # expert 1 gains load, as built
    assert set(s['curves']['entropy']) == {0, 1} and s['lbl_total'][-1][1] == pytest.approx(1.005)


def test_bad_results_are_clear_errors(tmp_path):
    good = synthetic_results()
    for mutate, match in [
        (lambda r: r.update(schema=1), 'results.schema'),
        (lambda r: r.update(budgets=[]), 'results.budgets'),
        (lambda r: r['arms'][0].update(arm=3), r'results.arms\[0\]'),
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


def test_results_without_wall_clock_drops_only_timing_fields():
    r = synthetic_results()
    r['wall_clock'] = {'stages_s': {'dense': 3.0}}
    stripped = RS.without_wall_clock(r)
    assert 'timing' not in stripped and 'wall_clock' not in stripped
    assert all('tokens_per_s' not in a and 'train_seconds' not in a for a in stripped['arms'])
    assert all('step_time_s' not in s for a in stripped['arms'] for s in a['per_seed'])
    assert stripped['arms'][0]['eval'] == r['arms'][0]['eval']
    json.dumps(stripped)


def test_regimes_report_shows_the_gain_against_the_base_length(tmp_path):
    from foundry_upcycle.study import regimes
    short, long = synthetic_results(), synthetic_results()
    short['regime'] = RS.regime({**short['dense'], 'pretrain_tokens': 16_000_000}, short['arms'], 512, 3e-3,
                                {'cpt': 1e-3, 'upcycle': 1e-3})
    summary = regimes.summarize({16.0: short, 64.0: long})
    assert [b['tokens_per_param'] for b in summary['bases']] == [16.0, 64.0]
    assert summary['bases'][1]['budgets']['1']['winner'] == 'upcycle'
    regimes.plot(summary, tmp_path / regimes.FIGURE)
    assert (tmp_path / regimes.FIGURE).read_bytes().startswith(PNG_MAGIC)
    text = regimes.render(summary)
    assert '| 16.0 | 3.500 | not the paper\'s regime |' in text and '-0.1000 [' in text and '(upcycle)' in text
    # the 16 tokens/param base at budget 1 trained as many phase-2 tokens as the 64 one at 0.25
    assert '## At equal phase-2 tokens' in text and regimes.equal_tokens(summary)
    from foundry_upcycle.study.config import StudyConfig
    cfg = StudyConfig.from_mapping({'out': str(tmp_path), 'pretrain_tokens_per_param': [16, 64]})
    assert cfg.regimes == (16.0, 64.0)
    assert regimes.sub_config(cfg, 16.0).out == str(tmp_path / 'tpp16') and not regimes.sub_config(cfg, 16.0).regimes


def test_relative_core_average_gain_only_where_cpt_is_above_chance(tmp_path):
    """A ratio of two near-chance scores is noise: the relative gain needs CPT's 95% interval above 0."""
    from foundry_upcycle.study.results_view import above_chance, ci_half
    results = synthetic_results()
    for a in results['arms']:                          # core averages of 0.03-0.06 that vary by 0.02 across seeds
        a['eval_sem']['core_average'] = 0.02
    cpt = next(a for a in results['arms'] if a['arm'] == 'cpt' and a['budget'] == 1.0)
    half = ci_half(cpt, 'core_average')
    assert half == pytest.approx(math.hypot(4.303 * 0.02, 1.96 * cpt['core_average_binomial_se']), rel=1e-3)
    assert not above_chance(cpt)                                        # 0.05 with bars ~0.09: at chance
    assert above_chance({**cpt, 'eval': {**cpt['eval'], 'core_average': 0.5}})
    F.plot_figure1(results, tmp_path / 'f1.png')                        # absolute values with intervals instead
    assert (tmp_path / 'f1.png').read_bytes().startswith(PNG_MAGIC)
