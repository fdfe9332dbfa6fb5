"""results.json (schema 3): every arm at every budget, aggregated over its seeds (mean, std, standard error, and
each seed's values), the regime the study ran in, the lr choice, the noise-aware comparisons, and the timing.

Contract (also read by bench/cost.py): each `arms[]` entry has `arm`, `budget`, `train_flops`, `train_tokens`
(= `tokens`), `eval` (metric -> mean over seeds), `n_seeds`, `eval_std`, `eval_sem` (metric -> value),
`per_seed` (a list of per-seed dicts) and `train_seconds` (mean over seeds). The fields in WALL_CLOCK_FIELDS are
measured time; everything else is a function of the config and seeds (two runs compare equal without them).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional

from foundry_upcycle.atomic import atomic_write
from foundry_upcycle.study import arms as arm_registry
from foundry_upcycle.study import stats
from foundry_upcycle.study.regime import regime
from foundry_upcycle.study.training import MIN_TAIL_STEPS, TAIL_FRACTION
from foundry_upcycle.study.verdicts import comparisons

SCHEMA = 3                 # 3: comparisons per arm ({arm: {budget: {metric: ...}}}) by the paired test; test splits
#                            (and comparisons_vs_paper: each variant against the paper's recipe, same shape)
EVAL_METRICS = ('ce_generic', 'ce_domain', 'ce_domain_val', 'core_average')
HELDOUT_REPORTED = ('domain', 'generic')       # the test splits whose per-document losses each seed keeps
WALL_CLOCK_FIELDS = ('wall_clock', 'timing', 'arms[].tokens_per_s', 'arms[].step_time_s', 'arms[].train_seconds',
                     'arms[].per_seed[].tokens_per_s', 'arms[].per_seed[].step_time_s',
                     'arms[].per_seed[].train_seconds')


def _eval_entry(res: Mapping[str, Any], units: bool = True) -> dict[str, Any]:
    keys = ('ce_generic', 'ce_domain', 'ce_domain_val', 'core_average', 'core_average_foundry', 'tasks',
            'icl_examples', 'categories_without_tasks', 'categories_dropped_by_foundry')
    out = {k: res.get(k) for k in keys if k in res}
    if units and res.get('heldout'):
        out['heldout'] = {k: v for k, v in res['heldout'].items() if k in HELDOUT_REPORTED}
    return out


def _binomial_se(ev: Mapping[str, Any]) -> Optional[float]:
    from foundry_upcycle.study.gauntlet import BENCHMARKS
    if not ev.get('tasks') or not ev.get('icl_examples'):
        return None
    return stats.core_average_binomial_se(ev['tasks'], ev['icl_examples'], BENCHMARKS)


def _mean_eval(evals: list[Mapping[str, Any]]) -> tuple[dict, dict, dict]:
    """(mean, std, sem) per metric over seeds; per-task scores are averaged too."""
    mean, std, sem = {k: v for k, v in evals[0].items() if k != 'heldout'}, {}, {}
    for key in EVAL_METRICS:
        s = stats.summary([e.get(key) for e in evals if e.get(key) is not None])
        if s['n']:
            mean[key], std[key], sem[key] = s['mean'], s['std'], s['sem']
    tasks = sorted({t for e in evals for t in (e.get('tasks') or {})})
    if tasks:
        mean['tasks'] = {t: stats.summary([(e.get('tasks') or {}).get(t) for e in evals])['mean'] for t in tasks}
    return mean, std, sem


def _seed_entry(out: Mapping[str, Any], ev: Mapping[str, Any]) -> dict[str, Any]:
    entry = {'seed': out.get('seed'), 'router_seed': out.get('router_seed'), 'eval': ev,
             'core_average_binomial_se': _binomial_se(ev),
             'train_ce_final': out.get('train_ce_final'), 'train_ce_window': out.get('train_ce_window'),
             'train_ce_metric': out.get('train_ce_metric'), 'tokens_per_s': out.get('tokens_per_s'), 'step_time_s': out.get('step_time_s'),
             'train_seconds': out.get('train_seconds'), 'loss_curve': out.get('loss_curve')}
    if 'lbl_final' in out:
        entry['lbl_final'] = out['lbl_final']
    if out.get('router'):
        entry['router'] = out['router']
    return entry


def _mean(values) -> Optional[float]:
    return stats.summary([v for v in values if v is not None])['mean']


def arm_entry(study, arm: str, budget: float, seeds: list, lr: float) -> dict[str, Any]:
    """One (arm, budget) aggregated over its seeds. seeds: [(train StageResult, eval StageResult), ...]."""
    plan, cfg = study.plan, study.cfg
    per_seed = [_seed_entry(st.outputs, _eval_entry(ev.outputs)) for st, ev in seeds]
    first = seeds[0][0].outputs
    mean, std, sem = _mean_eval([s['eval'] for s in per_seed])
    total, active = plan.params[arm]
    train_ce = stats.summary([s['train_ce_final'] for s in per_seed])
    from foundry_upcycle.study.recipes import warmup
    out = {
        'arm': arm, 'budget': budget, 'lr': lr, 'n_seeds': len(seeds), 'seeds': [s['seed'] for s in per_seed],
        'tokens': first['tokens'], 'train_tokens': first['tokens'], 'target_tokens': plan.target_tokens[(arm, budget)],
        'steps': first['steps'], 'warmup': warmup(first['steps'], cfg.warmup_fraction),
        'train_flops': first['tokens'] * plan.flops[arm], 'flops_per_token': plan.flops[arm],
        'total_params': total, 'active_params': active,
        'train_ce_final': train_ce['mean'], 'train_ce_final_std': train_ce['std'],
        'train_ce_window': first['train_ce_window'], 'train_ce_metric': first.get('train_ce_metric'),
        'domain_epochs': (first['tokens'] / study.data.tokens['domain/train']) if study.data is not None else None,
        'eval': mean, 'eval_std': std, 'eval_sem': sem,
        # the core average's noise from the finite ICL sets alone (binomial; the same examples for every seed)
        'core_average_binomial_se': _binomial_se(mean),
        'tokens_per_s': _mean(s['tokens_per_s'] for s in per_seed),
        'step_time_s': _mean(s['step_time_s'] for s in per_seed),
        'train_seconds': _mean(s['train_seconds'] for s in per_seed),
        'loss_curve': first['loss_curve'],
        'per_seed': per_seed,
    }
    if 'lbl_final' in first:
        out['lbl_final'] = _mean(s.get('lbl_final') for s in per_seed)
    if first.get('router'):
        out['router'] = first['router']            # seed 0's router curves (per-seed ones are in per_seed)
    return out


def build_results(study, dense, dense_eval, runs: Mapping, evals: Mapping, lrs: Mapping[str, float],
                  sweep: Optional[Mapping[str, Any]], timing) -> dict[str, Any]:
    plan, cfg = study.plan, study.cfg
    config = cfg.to_mapping()
    config['upcycle'] = plan.upcycle_block          # the effective block (recipe + overrides)
    config['upcycle_overrides'] = dict(cfg.upcycle)
    config['eval']['local_data'] = cfg.eval.local_data_id()
    entries = []
    for b in cfg.budgets:
        for arm in cfg.arms:
            seeds = [(runs[(arm, b, i)], evals[(arm, b, i)]) for i in range(cfg.seeds_at(b))]
            entries.append(arm_entry(study, arm, b, seeds, lrs[arm]))
    base = arm_registry.BASELINE
    dense_total, _ = plan.params[base]
    dense_entry = {
        'params': dense_total, 'flops_per_token': plan.flops[base], 'pretrain_tokens': plan.pretrain_tokens,
        'pretrain_flops': plan.pretrain_tokens * plan.flops[base], 'pretrain_steps': dense.outputs['steps'],
        'pretrain_lr': plan.pretrain_lr, 'train_ce_final': dense.outputs.get('train_ce_final'),
        'eval': _eval_entry(dense_eval.outputs, units=False),
    }
    dense_entry['core_average_binomial_se'] = _binomial_se(dense_entry['eval'])
    vocab = study.data.vocab_size if study.data is not None else plan.dense_model.get('vocab_size')
    missing, not_selected = _task_coverage(cfg, dense_eval.outputs)
    wall = {s.name: s.seconds for s in study._all_stage_results}
    wall['data'] = study.data_seconds
    sets = {k: {f: v[f] for f in ('split', 'unit', 'documents', 'clusters')} for k, v in study.runs.eval_sets().items()}
    train_ce = sorted({s.get('train_ce_metric') for a in entries for s in a['per_seed'] if s.get('train_ce_metric')})
    return {
        'schema': SCHEMA,
        'config': config,
        'budgets': list(cfg.budgets),
        'token_ratio': plan.token_ratio,
        'router_weights': plan.upcycle_block.get('router_weights', 'renormalized'),
        'lr': {**{a: lrs[a] for a in cfg.arms}, 'source': 'sweep on validation' if sweep else 'recipes / flags',
               'sweep': sweep},
        'train_ce_definition': f'mean training CE over the last {TAIL_FRACTION:.0%} of a run\'s steps '
                               f'(at least {MIN_TAIL_STEPS}; all steps of a shorter run)',
        'train_ce_metric': train_ce,
        'eval_sets': sets,
        'data': _data_fingerprint(study),
        'missing_eval_tasks': missing,
        'not_selected_eval_tasks': not_selected,
        'dense': dense_entry,
        'arms': entries,
        'comparisons': comparisons(entries, list(cfg.budgets), cfg.arms, sets),
        'comparisons_vs_paper': comparisons(entries, list(cfg.budgets),
                                            tuple(a for a in cfg.arms if a != arm_registry.BASELINE), sets,
                                            base=arm_registry.PRIMARY),
        'regime': regime(dense_entry, entries, vocab, plan.pretrain_lr, lrs),
        'timing': dict(timing.outputs) if timing is not None else None,
        'wall_clock': {'stages_s': wall},
        'wall_clock_fields': list(WALL_CLOCK_FIELDS),
    }


def _data_fingerprint(study) -> dict[str, Any]:
    """What the data was (so that two runs that disagree show why): the data config hash (which includes the
    Python version, whose standard library is the built-in domain corpus), the tokenizer's hash, the token counts."""
    import hashlib
    import platform
    out: dict[str, Any] = {'python': platform.python_version(), 'config_hash': study.data_hash}
    if study.data is not None:
        out['tokenizer_sha256'] = hashlib.sha256(
            (Path(study.data.tokenizer_dir) / 'tokenizer.json').read_bytes()).hexdigest()[:16]
        out['tokens'] = dict(study.data.tokens)
    return out


def _task_coverage(cfg, dense_eval: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    from foundry_upcycle.study.gauntlet import BENCHMARKS
    if cfg.eval.resolved_local_data() is None:
        return list(BENCHMARKS), []
    return list(dense_eval.get('missing_tasks') or []), list(dense_eval.get('not_selected_tasks') or [])


def without_wall_clock(results: Mapping[str, Any]) -> dict[str, Any]:
    """results minus its measured-time fields (WALL_CLOCK_FIELDS): what two identical runs must agree on."""
    import copy
    out = copy.deepcopy(dict(results))
    for f in WALL_CLOCK_FIELDS:
        parts = f.split('.')
        _drop(out, parts)
    return out


def _drop(obj: Any, parts: list[str]) -> None:
    head, rest = parts[0], parts[1:]
    if head.endswith('[]'):
        for item in obj.get(head[:-2]) or []:
            _drop(item, rest)
    elif not rest:
        obj.pop(head, None)
    elif isinstance(obj.get(head), dict):
        _drop(obj[head], rest)


def write_json(path: Path, obj: Any) -> None:
    from foundry_upcycle.bench.outputs import jsonable
    text = json.dumps(jsonable(obj), indent=1, allow_nan=False) + '\n'
    atomic_write(str(path), lambda tmp: Path(tmp).write_text(text))

