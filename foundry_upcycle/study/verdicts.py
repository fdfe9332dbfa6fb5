"""Which arm is ahead: every non-baseline arm against the baseline (CPT), per budget and metric, with its noise.

`comparisons(arms, budgets, names)` -> {arm: {budget: {metric: verdict}}} (results.json `comparisons`); the same
against the paper's recipe for the variants (`comparisons(..., base='upcycle')`, results.json `comparisons_vs_paper`).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

from foundry_upcycle.study import arms as arm_registry
from foundry_upcycle.study import stats

VERDICT_METRICS = (('ce_domain', True), ('core_average', False))     # (metric, lower is better)


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




def comparisons(entries: list[Mapping[str, Any]], budgets: list[float],
                names: tuple[str, ...] = arm_registry.DEFAULT_ARMS,
                base: str = arm_registry.BASELINE) -> dict[str, dict[str, dict[str, Any]]]:
    """{arm: {budget: {metric: c}}} for every arm of `names` but `base`, against `base` (CPT; the paper's recipe for
    the variants): c['winner'] is the arm's name, the base's, 'within noise' or 'n/a' (2-SE rule)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for metric, lower in VERDICT_METRICS:
        pooled = {arm: pooled_run_std(entries, arm, metric) for arm in names}
        for arm in names:
            if arm == base:
                continue
            for b in budgets:
                by = {a['arm']: a for a in entries if math.isclose(a['budget'], b) and a['arm'] in (arm, base)}
                if set(by) != {arm, base}:
                    continue
                (se_a, src_a), (se_b, src_b) = (arm_se(by[x], metric, pooled[x]) for x in (arm, base))
                c = stats.compare(lower, by[arm]['eval'].get(metric), se_a, by[base]['eval'].get(metric), se_b)
                c['winner'] = {'a': arm, 'b': base}.get(c['winner'], c['winner'])
                c.update(arm=arm, baseline=base, value=by[arm]['eval'].get(metric),
                         baseline_value=by[base]['eval'].get(metric), se_source={arm: src_a, base: src_b})
                out.setdefault(arm, {}).setdefault(f'{b:g}', {})[metric] = c
    return out
