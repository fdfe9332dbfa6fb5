"""Which arm is ahead: every non-baseline arm against the baseline (CPT), per budget and metric, by the paired test
of `study/stats.py` (seeds paired; the held-out set's own noise from its documents, or the ICL examples).

`comparisons(entries, budgets, names, eval_sets)` -> {arm: {budget: {metric: verdict}}} (results.json
`comparisons`); each verdict holds the gap (arm - baseline), its 95% interval, its parts and the test's name, and
`winner`: the arm, the baseline, 'tie' (the interval holds 0) or 'n/a' (fewer than 2 seeds, or a value missing).
The same against the paper's recipe for the variants (`comparisons(..., base='upcycle')`, results.json
`comparisons_vs_paper`).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

from foundry_upcycle.study import arms as arm_registry
from foundry_upcycle.study import stats

# metric -> (held-out set whose documents it resamples, lower is better)
VERDICT_METRICS = {'ce_domain': ('domain', True), 'ce_generic': ('generic', True), 'core_average': (None, False)}


def _units(entry: Mapping[str, Any], name: str) -> Optional[list]:
    out = []
    for s in entry.get('per_seed') or []:
        units = (((s.get('eval') or {}).get('heldout') or {}).get(name) or {}).get('units')
        if not units:
            return None
        out.append(units)
    return out


def _binomial_var(entry: Mapping[str, Any]) -> Optional[float]:
    from foundry_upcycle.study.gauntlet import BENCHMARKS
    ev = entry.get('eval') or {}
    if not ev.get('tasks') or not ev.get('icl_examples'):
        return None
    return stats.core_average_binomial_var(ev['tasks'], ev['icl_examples'], BENCHMARKS)


def _test(arm: Mapping[str, Any], base: Mapping[str, Any], metric: str,
          eval_sets: Mapping[str, Mapping[str, Any]]) -> tuple[Optional[dict], str]:
    """(the paired test of arm - baseline on `metric`, what the eval-set noise resamples)."""
    name, _ = VERDICT_METRICS[metric]
    if [s.get('seed') for s in arm.get('per_seed') or []] != [s.get('seed') for s in base.get('per_seed') or []]:
        return None, 'the arms were not trained with the same seeds: nothing to pair'
    if name is not None:
        a, b = _units(arm, name), _units(base, name)
        if a is None or b is None:
            return None, 'no per-document losses'
        info = eval_sets.get(name) or {}
        clusters = info.get('clusters') or [str(i) for i in range(len(a[0]))]
        what = f'{len(set(clusters))} {info.get("unit", "unit")} clusters of the {info.get("split", "held-out")} split'
        return stats.paired_ce_gap(a, b, clusters), what
    per = [[(s.get('eval') or {}).get(metric) for s in e['per_seed']] for e in (arm, base)]
    va, vb = _binomial_var(arm), _binomial_var(base)
    if va is None or vb is None or any(v is None for v in per[0] + per[1]):
        return None, 'no ICL eval'
    examples = sum(((arm.get('eval') or {}).get('icl_examples') or {}).values())
    return stats.paired_gap(per[0], per[1], var_eval=va + vb, df_eval=max(1, examples - 1)), \
        f'{examples} ICL examples (binomial)'


def compare(arm: Mapping[str, Any], base: Mapping[str, Any], metric: str,
            eval_sets: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    _, lower = VERDICT_METRICS[metric]
    test, eval_noise = _test(arm, base, metric, eval_sets)
    outcome = stats.verdict(test, lower)
    c: dict[str, Any] = {
        'arm': arm['arm'], 'baseline': base['arm'], 'metric': metric, 'lower_is_better': lower,
        'value': (arm.get('eval') or {}).get(metric), 'baseline_value': (base.get('eval') or {}).get(metric),
        'winner': {'arm': arm['arm'], 'baseline': base['arm']}.get(outcome, outcome),
        'test': stats.TEST_NAME, 'alpha': stats.ALPHA, 'eval_noise': eval_noise,
    }
    if test is not None:
        c.update({k: test[k] for k in ('gap', 'ci', 'se', 'se_seeds', 'se_eval', 'df_seeds', 'df_eval', 'n_seeds',
                                      'per_seed')})
    else:
        v, bv = c['value'], c['baseline_value']
        c['gap'] = v - bv if v is not None and bv is not None else None
        c['why_no_verdict'] = eval_noise if eval_noise.startswith(('the arms', 'no ')) else \
            f'{min(arm.get("n_seeds", 1), base.get("n_seeds", 1))} seed(s): no seed-noise estimate'
    return c


def comparisons(entries: Sequence[Mapping[str, Any]], budgets: Sequence[float],
                names: Sequence[str] = arm_registry.DEFAULT_ARMS,
                eval_sets: Optional[Mapping[str, Mapping[str, Any]]] = None,
                base: str = arm_registry.BASELINE) -> dict[str, dict[str, dict[str, Any]]]:
    """{arm: {budget: {metric: verdict}}} for every arm of `names` but `base`, against `base` (CPT; the paper's
    recipe for the variants)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for arm in names:
        if arm == base:
            continue
        for b in budgets:
            by = {a['arm']: a for a in entries if math.isclose(a['budget'], b) and a['arm'] in (arm, base)}
            if set(by) != {arm, base}:
                continue
            out.setdefault(arm, {})[f'{b:g}'] = {m: compare(by[arm], by[base], m, eval_sets or {})
                                                 for m in VERDICT_METRICS}
    return out


def sentence(c: Optional[Mapping[str, Any]], labels: Mapping[str, str], digits: int = 4) -> str:
    """One verdict in words, with its interval and test: 'ahead' only when the interval excludes zero."""
    if not c or c.get('value') is None or c.get('baseline_value') is None:
        return 'not measured (an arm or its value is missing)'
    f = f'.{digits}f'
    values = (f'{c["value"]:{f}} ({labels.get(c["arm"], c["arm"])}) vs {c["baseline_value"]:{f}} '
              f'({labels.get(c["baseline"], c["baseline"])})')
    if c['winner'] == 'n/a':
        return f'{values}: no verdict ({c.get("why_no_verdict", "no noise estimate")})'
    lo, hi = c['ci']
    interval = (f'gap {c["gap"]:+{f}}, 95% CI [{lo:+{f}}, {hi:+{f}}]; {c["n_seeds"]} paired seeds, eval noise over '
                f'{c["eval_noise"]}')
    if c['winner'] == 'tie':
        return f'tie: {values}, {interval}'
    return f'**{labels.get(c["winner"], c["winner"])}** ahead: {values}, {interval}'
