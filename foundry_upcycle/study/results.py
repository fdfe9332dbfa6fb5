"""results.json (schema 2): every arm at every budget, aggregated over its seeds (mean, std, standard error, and
each seed's values), the regime the study ran in, the lr choice, the noise-aware comparisons, and the timing.

Contract (also read by bench/cost.py): each `arms[]` entry has `arm`, `budget`, `train_flops`, `train_tokens`
(= `tokens`), `eval` (metric -> mean over seeds), `n_seeds`, `eval_std`, `eval_sem` (metric -> value),
`per_seed` (a list of per-seed dicts) and `train_seconds` (mean over seeds). The fields in WALL_CLOCK_FIELDS are
measured time; everything else is a function of the config and seeds (two runs compare equal without them).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Optional

from foundry_upcycle.atomic import atomic_write
from foundry_upcycle.study import stats
from foundry_upcycle.study.training import MIN_TAIL_STEPS, TAIL_FRACTION

SCHEMA = 2
ARMS = ('cpt', 'upcycle')
EVAL_METRICS = ('ce_generic', 'ce_domain', 'core_average')
WALL_CLOCK_FIELDS = ('wall_clock', 'timing', 'arms[].tokens_per_s', 'arms[].step_time_s', 'arms[].train_seconds',
                     'arms[].per_seed[].tokens_per_s', 'arms[].per_seed[].step_time_s',
                     'arms[].per_seed[].train_seconds')
PAPER_TOKENS_PER_PARAM = (100, 460)      # Table 2: 436M x 100 / 200 / 460 ... 1.4B x 100 / 250
PAPER_CPT_SLOPE = (0.014, 0.025)         # nats of CE per doubling of CPT tokens, read off the paper's curves
OVERTRAINED_TOKENS_PER_PARAM = 60        # below this the base is not in the paper's regime
NEAR_CHANCE = 0.9                        # base domain CE above this fraction of ln(V): the base barely knows the domain


def _eval_entry(res: Mapping[str, Any]) -> dict[str, Any]:
    keys = ('ce_generic', 'ce_domain', 'core_average', 'core_average_foundry', 'tasks', 'icl_examples',
            'categories_without_tasks', 'categories_dropped_by_foundry')
    return {k: res.get(k) for k in keys if k in res}


def _binomial_se(ev: Mapping[str, Any]) -> Optional[float]:
    from foundry_upcycle.study.gauntlet import BENCHMARKS
    if not ev.get('tasks') or not ev.get('icl_examples'):
        return None
    return stats.core_average_binomial_se(ev['tasks'], ev['icl_examples'], BENCHMARKS)


def _mean_eval(evals: list[Mapping[str, Any]]) -> tuple[dict, dict, dict]:
    """(mean, std, sem) per metric over seeds; per-task scores are averaged too."""
    mean, std, sem = dict(evals[0]), {}, {}
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
             'tokens_per_s': out.get('tokens_per_s'), 'step_time_s': out.get('step_time_s'),
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
    binom = [s['core_average_binomial_se'] for s in per_seed if s['core_average_binomial_se'] is not None]
    train_ce = stats.summary([s['train_ce_final'] for s in per_seed])
    from foundry_upcycle.study.recipes import warmup
    out = {
        'arm': arm, 'budget': budget, 'lr': lr, 'n_seeds': len(seeds), 'seeds': [s['seed'] for s in per_seed],
        'tokens': first['tokens'], 'train_tokens': first['tokens'], 'target_tokens': plan.target_tokens[(arm, budget)],
        'steps': first['steps'], 'warmup': warmup(first['steps'], cfg.warmup_fraction),
        'train_flops': first['tokens'] * plan.flops[arm], 'flops_per_token': plan.flops[arm],
        'total_params': total, 'active_params': active,
        'train_ce_final': train_ce['mean'], 'train_ce_final_std': train_ce['std'],
        'train_ce_window': first['train_ce_window'],
        'eval': mean, 'eval_std': std, 'eval_sem': sem,
        # the core average's noise from the finite eval sets alone (binomial), for the mean over seeds
        'core_average_binomial_se': (math.sqrt(sum(b * b for b in binom)) / len(binom)) if binom else None,
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


# ------------------------------------------------------------------------------------------- noise and verdicts


def pooled_run_std(arms: list[Mapping[str, Any]], arm: str, metric: str) -> Optional[float]:
    """The seed-to-seed std of one run's metric, pooled over the budgets that have >= 2 seeds (None if none)."""
    num, den = 0.0, 0
    for a in arms:
        s = (a.get('eval_std') or {}).get(metric)
        if a['arm'] == arm and s is not None and a['n_seeds'] >= 2:
            num += (a['n_seeds'] - 1) * s * s
            den += a['n_seeds'] - 1
    return math.sqrt(num / den) if den else None


def arm_se(a: Mapping[str, Any], metric: str, pooled: Optional[float]) -> tuple[Optional[float], str]:
    """(standard error of the arm's mean, where it came from)."""
    n = a['n_seeds']
    sem = (a.get('eval_sem') or {}).get(metric)
    if metric == 'core_average':
        binom = a.get('core_average_binomial_se')
        if binom is None:
            return None, 'no ICL eval'
        seeds = sem if sem is not None else (pooled / math.sqrt(n) if pooled is not None else 0.0)
        return math.sqrt(seeds ** 2 + binom ** 2), 'binomial + seeds'
    if sem is not None:
        return sem, f'{n} seeds'
    if pooled is not None:
        return pooled / math.sqrt(n), 'seed spread pooled from the budgets with several seeds'
    return None, 'one seed, no noise estimate'


def comparisons(arms: list[Mapping[str, Any]], budgets: list[float]) -> dict[str, dict[str, Any]]:
    """Per budget and metric: upcycled vs CPT with the 2-SE rule ('upcycle' | 'cpt' | 'within noise' | 'n/a')."""
    out: dict[str, dict[str, Any]] = {}
    for metric, lower in (('ce_domain', True), ('core_average', False)):
        pooled = {arm: pooled_run_std(arms, arm, metric) for arm in ARMS}
        for b in budgets:
            by = {a['arm']: a for a in arms if math.isclose(a['budget'], b)}
            if set(by) != set(ARMS):
                continue
            (se_up, src_up), (se_cpt, src_cpt) = (arm_se(by[arm], metric, pooled[arm]) for arm in ARMS[::-1])
            c = stats.compare(lower, by['upcycle']['eval'].get(metric), se_up, by['cpt']['eval'].get(metric), se_cpt)
            c['winner'] = {'a': 'upcycle', 'b': 'cpt'}.get(c['winner'], c['winner'])
            c.update(upcycle=by['upcycle']['eval'].get(metric), cpt=by['cpt']['eval'].get(metric),
                     se_source={'upcycle': src_up, 'cpt': src_cpt})
            out.setdefault(f'{b:g}', {})[metric] = c
    return out


def regime(dense: Mapping[str, Any], arms: list[Mapping[str, Any]], vocab_size: Optional[int],
           pretrain_lr: Optional[float], lrs: Mapping[str, float]) -> dict[str, Any]:
    """Where this study sits against the paper: base tokens/param, base domain CE vs chance, CPT slope."""
    tpp = dense['pretrain_tokens'] / dense['params'] if dense.get('params') else None
    chance = math.log(vocab_size) if vocab_size else None
    base_ce = (dense.get('eval') or {}).get('ce_domain')
    cpt = sorted((a['tokens'], a['eval'].get('ce_domain')) for a in arms if a['arm'] == 'cpt')
    slope = stats.doubling_slope(cpt)
    overtrained = tpp is not None and tpp >= OVERTRAINED_TOKENS_PER_PARAM
    knows_domain = base_ce is not None and chance is not None and base_ce < NEAR_CHANCE * chance
    lrs_below_peak = pretrain_lr is None or all(lr < pretrain_lr for lr in lrs.values())
    reasons = []
    if not overtrained:
        reasons.append(f'the base saw {tpp:.3g} tokens per parameter (the paper: {PAPER_TOKENS_PER_PARAM[0]}-'
                       f'{PAPER_TOKENS_PER_PARAM[1]}; this study needs >= {OVERTRAINED_TOKENS_PER_PARAM})'
                       if tpp is not None else 'the base\'s pretraining length is unknown')
    if not knows_domain:
        reasons.append('the base is near chance on the domain (held-out domain CE '
                       f'{base_ce if base_ce is not None else float("nan"):.3f} vs ln V = '
                       f'{chance if chance is not None else float("nan"):.3f}): phase 2 learns the domain from '
                       'scratch, the most data-bound task there is')
    if not lrs_below_peak:
        reasons.append(f'a phase-2 lr ({", ".join(f"{k} {v:g}" for k, v in lrs.items())}) is not below the '
                       f'pretraining peak {pretrain_lr:g}')
    return {
        'base_tokens_per_param': tpp, 'paper_tokens_per_param': list(PAPER_TOKENS_PER_PARAM),
        'base_ce_domain': base_ce, 'chance_ce': chance, 'vocab_size': vocab_size,
        'cpt_slope_per_doubling': slope, 'paper_cpt_slope_per_doubling': list(PAPER_CPT_SLOPE),
        'pretrain_lr': pretrain_lr, 'phase2_lrs': dict(lrs),
        'tests_paper_claim': not reasons, 'why_not': reasons,
        'label': 'paper regime (over-trained base)' if not reasons else 'not the paper\'s regime',
    }


def build_results(study, dense, dense_eval, runs: Mapping, evals: Mapping, lrs: Mapping[str, float],
                  sweep: Optional[Mapping[str, Any]], timing) -> dict[str, Any]:
    plan, cfg = study.plan, study.cfg
    config = cfg.to_mapping()
    config['upcycle'] = plan.upcycle_block          # the effective block (recipe + overrides)
    config['upcycle_overrides'] = dict(cfg.upcycle)
    config['eval']['local_data'] = cfg.eval.local_data_id()
    entries = []
    for b in cfg.budgets:
        for arm in ARMS:
            seeds = [(runs[(arm, b, i)], evals[(arm, b, i)]) for i in range(cfg.seeds_at(b))]
            entries.append(arm_entry(study, arm, b, seeds, lrs[arm]))
    dense_total, _ = plan.params['cpt']
    dense_entry = {
        'params': dense_total, 'flops_per_token': plan.flops['cpt'], 'pretrain_tokens': plan.pretrain_tokens,
        'pretrain_flops': plan.pretrain_tokens * plan.flops['cpt'], 'pretrain_steps': dense.outputs['steps'],
        'pretrain_lr': plan.pretrain_lr, 'train_ce_final': dense.outputs.get('train_ce_final'),
        'eval': _eval_entry(dense_eval.outputs),
    }
    dense_entry['core_average_binomial_se'] = _binomial_se(dense_entry['eval'])
    vocab = study.data.vocab_size if study.data is not None else plan.dense_model.get('vocab_size')
    missing, not_selected = _task_coverage(cfg, dense_eval.outputs)
    wall = {s.name: s.seconds for s in study._all_stage_results}
    wall['data'] = study.data_seconds
    return {
        'schema': SCHEMA,
        'config': config,
        'budgets': list(cfg.budgets),
        'token_ratio': plan.token_ratio,
        'router_weights': plan.upcycle_block.get('router_weights', 'renormalized'),
        'lr': {'cpt': lrs['cpt'], 'upcycle': lrs['upcycle'], 'source': 'sweep' if sweep else 'recipes / flags',
               'sweep': sweep},
        'train_ce_definition': f'mean training CE over the last {TAIL_FRACTION:.0%} of a run\'s steps '
                               f'(at least {MIN_TAIL_STEPS}; all steps of a shorter run)',
        'data': _data_fingerprint(study),
        'missing_eval_tasks': missing,
        'not_selected_eval_tasks': not_selected,
        'dense': dense_entry,
        'arms': entries,
        'comparisons': comparisons(entries, list(cfg.budgets)),
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


# ------------------------------------------------------------------------------------------- notes


def study_notes(results: Mapping[str, Any], study) -> str:
    """A report section on how the numbers were made: steps, CE windows, warmups, seeds, data, timings."""
    cfg, plan = study.cfg, study.plan
    lines = ['## How this study ran']
    lines.append(f'Scale `{cfg.scale}`, base seed {cfg.seed}; recipes ' + ', '.join(
        f'`{Path(cfg.recipe_path(k)).name}`' for k in ((('pretrain',) if cfg.pretrains else ()) + ARMS)) +
        f'; training sequence length {plan.seq_len}, {plan.tokens_per_step:,} tokens per step in every run; '
        f'{cfg.threads or "default"} torch threads.')
    if study.data is not None:
        toks = study.data.tokens
        lines.append(f'Data: {toks["generic/train"]:,} generic and {toks["domain/train"]:,} domain training tokens; '
                     f'held-out validation {toks["generic/val"]:,} generic and {toks["domain/val"]:,} domain tokens.')
    lines.append(f'Each arm\'s steps are its FLOP-matched token budget ({plan.flops["cpt"]:.3g} training FLOPs per '
                 f'token dense, {plan.flops["upcycle"]:.3g} upcycled, i.e. 6 x active non-embedding + LM-head '
                 'parameters + attention) rounded to whole steps; each phase-2 run has a fresh linear warm-up over '
                 f'{100 * cfg.warmup_fraction:g}% of its steps, then cosine decay to 0.')
    lines.append(f'Seeds: {cfg.seeds} at the largest budget, {cfg.seeds_other} at the others; phase-2 seed i trains '
                 f'with seed {cfg.seed} + i (data order) and router seed (block seed + i).')
    lines.append(f'Training CE is the {results["train_ce_definition"]}.')
    lines.append('Wall-clock fields of results.json (`' + '`, `'.join(WALL_CLOCK_FIELDS) + '`) change between '
                 'identical runs; everything else is reproducible.')
    tasks = sorted((results['dense'].get('eval') or {}).get('tasks') or {})
    if tasks:
        examples = (results['dense'].get('eval') or {}).get('icl_examples') or {}
        lines.append('ICL tasks evaluated (examples each): ' + ', '.join(f'{t} ({examples.get(t, "?")})'
                                                                          for t in tasks) + '. ' +
                     f'Eval data: `{results["config"]["eval"]["local_data"]}`. '
                     'The core average here is over the categories with at least one evaluated task.')
    else:
        lines.append('No ICL tasks were evaluated (no eval data); there is no core average.')
    clock = results['wall_clock']
    wall = clock['stages_s']
    lines.append('Stage times (s, this machine): ' + ', '.join(f'{k} {v:.0f}' for k, v in wall.items()) + '.')
    jobs = clock.get('jobs') or 1
    if jobs > 1:
        lines.append(f'Phase-2 runs trained {jobs} at a time in worker processes ({cfg.threads or "default"} torch '
                     f'thread(s) each; the numbers do not depend on it), so their `train_seconds` were measured with '
                     f'{jobs} runs sharing the machine; the step-time ratio comes from the timing stage, run alone.')
    if clock.get('elapsed_s') is not None:
        start = clock.get('load_average_start') or []
        busy = bool(start) and clock.get('cpu_count') and start[0] > 0.5 * clock['cpu_count']
        lines.append(f'Whole study until results.json: {clock["elapsed_s"]:.0f} s on {clock.get("cpu_count")} CPUs; '
                     f'load average (1/5/15 min) {start} at the start and {clock.get("load_average_end")} at the '
                     'end (the study\'s own runs count in the latter). ' +
                     ('**The machine was busy before the study started: its times are pessimistic.**' if busy else
                      'The machine was idle at the start.'))
    return '\n\n'.join(lines) + '\n'
