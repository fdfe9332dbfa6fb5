"""Read-only access to a results.json (schema 3, see study/results.py) for the report and its figures."""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

from foundry_upcycle.study import arms as arm_registry

SCHEMA = 3
DENSE_LABEL = 'dense base (before CPT / upcycling)'
DENSE_COLOR = '#444444'


def num(x: Any) -> Optional[float]:
    """A finite float, or None for missing / non-numeric / NaN values."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return float(x)


def eval_value(entry: Optional[Mapping[str, Any]], key: str) -> Optional[float]:
    return num(((entry or {}).get('eval') or {}).get(key))


def check_results(results: Any) -> None:
    """ValueError naming what is wrong when `results` does not follow schema 2."""
    if not isinstance(results, Mapping):
        raise ValueError(f'results: expected a mapping (results.json object), got {type(results).__name__}')
    if results.get('schema') != SCHEMA:
        raise ValueError(f'results.schema is {results.get("schema")!r}; this report reads schema {SCHEMA}')
    if not isinstance(results.get('budgets'), list) or not results['budgets'] \
            or any(num(b) is None for b in results['budgets']):
        raise ValueError(f'results.budgets must be a non-empty list of numbers, got {results.get("budgets")!r}')
    if not isinstance(results.get('arms'), list):
        raise ValueError('results.arms must be a list')
    for i, arm in enumerate(results['arms']):
        if not isinstance(arm, Mapping) or not isinstance(arm.get('arm'), str) or num(arm.get('budget')) is None:
            raise ValueError(f'results.arms[{i}] needs an arm name and a numeric budget, got {arm!r}')


def find_arm(results: Mapping[str, Any], arm: str, budget: float) -> Optional[Mapping[str, Any]]:
    return next((a for a in results['arms'] if a['arm'] == arm and math.isclose(a['budget'], budget)), None)


def budgets_of(results: Mapping[str, Any]) -> list[float]:
    return sorted(float(b) for b in results['budgets'])



def arm_names(results: Mapping[str, Any]) -> list[str]:
    """The study's arms, the baseline first (config.arms; else the arms present, in order)."""
    names = list((results.get('config') or {}).get('arms') or [])
    for a in results.get('arms') or []:
        if a.get('arm') not in names:
            names.append(a['arm'])
    return sorted(names, key=lambda n: n != arm_registry.BASELINE)


def ci_half(entry: Optional[Mapping[str, Any]], metric: str) -> Optional[float]:
    """Half-width of the 95% interval of an arm's mean: seeds at Student t (n - 1 df), and for the core average
    the ICL examples' binomial noise too (stats.gap_test's rule). None without a noise estimate."""
    from foundry_upcycle.study import stats
    if not entry:
        return None
    n = entry.get('n_seeds') or 1
    sem = num((entry.get('eval_sem') or {}).get(metric))
    var_eval = num(entry.get('core_average_binomial_se')) ** 2 if (
        metric == 'core_average' and num(entry.get('core_average_binomial_se')) is not None) else 0.0
    if sem is None or n < 2:
        return None
    return stats.gap_test(0.0, sem * sem, n - 1, var_eval, math.inf)['ci'][1]


def above_chance(entry: Optional[Mapping[str, Any]]) -> bool:
    """The arm's core average is significantly above chance (0): its 95% interval lies above 0."""
    mean, half = eval_value(entry, 'core_average'), ci_half(entry, 'core_average')
    return mean is not None and half is not None and mean - half > 0


def flop_ratio(results: Mapping[str, Any]) -> Optional[float]:
    """Per-token training FLOPs of the upcycled model over the dense one (= expected step-time ratio)."""
    fpts = {}
    for arm in (arm_registry.BASELINE, arm_registry.PRIMARY):
        fpts[arm] = next((num(a.get('flops_per_token')) for a in results['arms']
                          if a['arm'] == arm and num(a.get('flops_per_token'))), None)
    if fpts['cpt'] is None or fpts['upcycle'] is None:
        ratio = num(results.get('token_ratio'))
        return 1 / ratio if ratio else None
    return fpts['upcycle'] / fpts['cpt']

