"""Noise: mean / spread over seeds, the binomial standard error of a core average, and the 2-SE winner rule.

Pure Python. A gap counts only when it exceeds twice its standard error; otherwise the arms are "within noise".
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

Z = 2.0        # a winner needs |gap| > Z x SE(gap)


def summary(values: Sequence[float]) -> dict[str, Optional[float]]:
    """mean, sample std (n-1) and standard error of the mean; std / sem are None for fewer than 2 values."""
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {'mean': None, 'std': None, 'sem': None, 'n': 0}
    n = len(vals)
    mean = sum(vals) / n
    if n < 2:
        return {'mean': mean, 'std': None, 'sem': None, 'n': n}
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    return {'mean': mean, 'std': std, 'sem': std / math.sqrt(n), 'n': n}


def core_average_binomial_se(tasks: Mapping[str, float], examples: Mapping[str, int],
                             benchmarks: Mapping[str, tuple[str, int, float]]) -> Optional[float]:
    """Standard error of our core average from the examples' binomial noise alone.

    tasks: task -> chance-normalised score s = (acc - b) / (1 - b); examples: task -> N evaluated. Var(acc) =
    acc (1 - acc) / N, so Var(s) = Var(acc) / (1 - b)^2; a category is the mean of its m tasks (Var / m^2 summed),
    the core average the mean of the C categories with tasks (same rule)."""
    by_cat: dict[str, list[float]] = {}
    for task, score in tasks.items():
        if task not in benchmarks or not examples.get(task) or score is None:
            continue
        cat, _, base = benchmarks[task]
        acc = min(1.0, max(0.0, score * (1 - base) + base))
        by_cat.setdefault(cat, []).append(acc * (1 - acc) / examples[task] / (1 - base) ** 2)
    if not by_cat:
        return None
    cat_vars = [sum(v) / len(v) ** 2 for v in by_cat.values()]
    return math.sqrt(sum(cat_vars)) / len(cat_vars)


def compare(lower_is_better: bool, a: Optional[float], se_a: Optional[float], b: Optional[float],
            se_b: Optional[float]) -> dict[str, Optional[float] | str]:
    """Arm a vs arm b: {'winner': 'a' | 'b' | 'within noise' | 'n/a', 'gap': a - b, 'se': SE(gap)}.

    'n/a' when a value or either SE is missing (no noise estimate: no verdict)."""
    if a is None or b is None:
        return {'winner': 'n/a', 'gap': None, 'se': None}
    gap = a - b
    if se_a is None or se_b is None:
        return {'winner': 'n/a', 'gap': gap, 'se': None}
    se = math.sqrt(se_a ** 2 + se_b ** 2)
    if abs(gap) <= Z * se:
        return {'winner': 'within noise', 'gap': gap, 'se': se}
    a_better = gap < 0 if lower_is_better else gap > 0
    return {'winner': 'a' if a_better else 'b', 'gap': gap, 'se': se}


def doubling_slope(points: Sequence[tuple[float, float]]) -> Optional[float]:
    """Least-squares drop of y per doubling of x (positive = y falls as x doubles); None for < 2 distinct x."""
    pts = [(math.log2(x), y) for x, y in points if x and x > 0 and y is not None]
    if len({x for x, _ in pts}) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return -sum((x - mx) * (y - my) for x, y in pts) / sxx
