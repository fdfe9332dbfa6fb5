"""Noise and verdicts: per-seed summaries, and the paired test every verdict of the study uses.

`paired_gap` compares two arms trained with the same seeds (seed i gives both the same data order and, for an MoE,
router init) and evaluated on the same held-out set. Its gap is the mean over seeds of the per-seed difference d_i;
its variance has two parts:
- seeds: s^2 / n from the n paired differences (n - 1 degrees of freedom);
- the evaluation set: how much the mean gap would move if the held-out documents (or ICL examples) were drawn
  again. For cross-entropy, a delete-one-cluster jackknife over the held-out documents (a cluster: one source file
  or literary work, so excerpts of one work are not counted as independent); for the core average, the binomial
  variance of each task's accuracy.
Each part is taken at its own Student t (n - 1 df for the seeds, clusters - 1 for the documents) in the 95%
interval (`gap_test`). Two-sided, 5%: a verdict names a winner only when the interval excludes zero; otherwise the
arms tie. With one seed there is no seed-noise estimate and no
verdict. `tests/test_stats.py` simulates two arms from one distribution at 2 and 3 seeds: the false-positive rate
stays at or below 5%. (The old rule, |gap| > 2 SE with per-arm SEs, fires 14-30% of the time at 1-3 df.)
"""
from __future__ import annotations

import math
from statistics import NormalDist
from typing import Mapping, Optional, Sequence

ALPHA = 0.05
TEST_NAME = 'paired t over seeds (n-1 df) + held-out-set noise, two-sided 95% interval'


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


def _betainc_cf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta I_x(a, b) (modified Lentz), for x < (a+1)/(a+b+2)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    log_front = a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    return math.exp(log_front) * h / a


def _betainc(a: float, b: float, x: float) -> float:
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    if x < (a + 1) / (a + b + 2):
        return _betainc_cf(a, b, x)
    return 1.0 - _betainc_cf(b, a, 1.0 - x)


def t_cdf(t: float, df: float) -> float:
    """Student t CDF: 1 - I_{df/(df+t^2)}(df/2, 1/2) / 2 for t >= 0."""
    if math.isinf(df):
        return NormalDist().cdf(t)
    tail = 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """Student t quantile (standard library only: the study also runs where scipy is not installed), by bisection
    on `t_cdf` to double precision."""
    if not (0.0 < p < 1.0 and df > 0):
        raise ValueError(f't_quantile: need 0 < p < 1 and df > 0, got p={p!r}, df={df!r}')
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if math.isinf(df):                          # the normal limit (a binomial accuracy's interval)
        return NormalDist().inv_cdf(p)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def gap_test(gap: float, var_seeds: float, df_seeds: float, var_eval: float, df_eval: float,
             alpha: float = ALPHA) -> dict[str, float]:
    """A gap whose variance has a seed part (df_seeds) and an eval-set part (df_eval), and its (1 - alpha) interval.

    The half-width is sqrt(t(df_seeds)^2 var_seeds + t(df_eval)^2 var_eval): each part at its own Student t. This
    is exact when one part dominates and conservative in between; a Welch-Satterthwaite df (one t for the sum)
    is liberal at 2-3 seeds, because a small seed spread then also buys more degrees of freedom (8-13% false
    positives at 2 seeds in the simulation of tests/test_stats.py)."""
    q = 1 - alpha / 2
    half = math.sqrt(t_quantile(q, df_seeds) ** 2 * var_seeds + (t_quantile(q, df_eval) ** 2 * var_eval
                                                                  if var_eval > 0 else 0.0))
    se = math.sqrt(var_seeds + var_eval)
    return {'gap': gap, 'se': se, 'se_seeds': math.sqrt(var_seeds), 'se_eval': math.sqrt(var_eval),
            'df_seeds': df_seeds, 'df_eval': df_eval, 't': gap / se if se > 0 else 0.0,
            'ci': [gap - half, gap + half]}


def ce_from_docs(docs: Sequence[Sequence[float]]) -> float:
    """Token-weighted cross-entropy of [[nll_sum, n_tokens], ...]."""
    return sum(d[0] for d in docs) / sum(d[1] for d in docs)


def _cluster_sums(docs: Sequence[Sequence[float]], clusters: Sequence[str], order: list[str]) -> list[tuple]:
    acc: dict[str, list[float]] = {c: [0.0, 0.0] for c in order}
    for (nll, n), c in zip(docs, clusters):
        acc[c][0] += nll
        acc[c][1] += n
    return [tuple(acc[c]) for c in order]


def _jackknife_var(loo: Sequence[float]) -> float:
    g = len(loo)
    mean = sum(loo) / g
    return (g - 1) / g * sum((x - mean) ** 2 for x in loo)


def paired_ce_gap(arm_docs: Sequence[Sequence[Sequence[float]]], base_docs: Sequence[Sequence[Sequence[float]]],
                  clusters: Sequence[str], alpha: float = ALPHA) -> Optional[dict[str, float]]:
    """arm - baseline cross-entropy, paired by seed (arm_docs[i], base_docs[i]: seed i's [[nll, tokens], ...] over
    the same held-out documents), with a delete-one-cluster jackknife over the documents for the eval-set noise.
    None with fewer than 2 seeds (no seed-noise estimate)."""
    n = len(arm_docs)
    if n != len(base_docs) or n < 2:
        return None
    order = sorted(set(clusters))
    g = len(order)
    sums = [[_cluster_sums(d, clusters, order) for d in seeds] for seeds in (arm_docs, base_docs)]
    tot = [[(sum(x for x, _ in s), sum(y for _, y in s)) for s in side] for side in sums]
    d = [tot[0][i][0] / tot[0][i][1] - tot[1][i][0] / tot[1][i][1] for i in range(n)]
    gap = sum(d) / n
    var_seeds = sum((x - gap) ** 2 for x in d) / (n - 1) / n
    var_eval = 0.0
    if g >= 2:
        # leave-one-cluster-out gap of each seed: loo[i][k]
        loo = [[(tot[0][i][0] - sums[0][i][k][0]) / (tot[0][i][1] - sums[0][i][k][1])
                - (tot[1][i][0] - sums[1][i][k][0]) / (tot[1][i][1] - sums[1][i][k][1]) for k in range(g)]
               for i in range(n)]
        v_seed = [_jackknife_var(row) for row in loo]
        v_mean = _jackknife_var([sum(col) / n for col in zip(*loo)])
        # v_mean = doc-interaction + residual / n; each v_seed = doc-interaction + residual. The residual (run x
        # document noise) is already in the seeds' spread: count only the interaction (arms differ by document).
        var_eval = max(0.0, (n * v_mean - sum(v_seed) / n) / (n - 1))
    out = gap_test(gap, var_seeds, n - 1, var_eval, max(1, g - 1), alpha)
    out.update(n_seeds=n, per_seed=d, eval_units=g)
    return out


def paired_gap(arm: Sequence[float], base: Sequence[float], var_eval: float = 0.0, df_eval: float = math.inf,
               alpha: float = ALPHA) -> Optional[dict[str, float]]:
    """arm - baseline of a per-seed metric, paired by seed, plus an eval-set variance of the mean gap."""
    n = len(arm)
    if n != len(base) or n < 2 or any(v is None for v in (*arm, *base)):
        return None
    d = [a - b for a, b in zip(arm, base)]
    gap = sum(d) / n
    var_seeds = sum((x - gap) ** 2 for x in d) / (n - 1) / n
    out = gap_test(gap, var_seeds, n - 1, var_eval, df_eval, alpha)
    out.update(n_seeds=n, per_seed=d)
    return out


def core_average_binomial_var(tasks: Mapping[str, float], examples: Mapping[str, int],
                              benchmarks: Mapping[str, tuple[str, int, float]]) -> Optional[float]:
    """Variance of our core average from the examples' binomial noise alone.

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
    return sum(sum(v) / len(v) ** 2 for v in by_cat.values()) / len(by_cat) ** 2


def core_average_binomial_se(tasks: Mapping[str, float], examples: Mapping[str, int],
                             benchmarks: Mapping[str, tuple[str, int, float]]) -> Optional[float]:
    var = core_average_binomial_var(tasks, examples, benchmarks)
    return None if var is None else math.sqrt(var)


def verdict(test: Optional[Mapping[str, float]], lower_is_better: bool) -> str:
    """'arm' | 'baseline' | 'tie' | 'n/a' from a test of arm - baseline."""
    if test is None:
        return 'n/a'
    lo, hi = test['ci']
    if lo <= 0 <= hi:
        return 'tie'
    arm_lower = hi < 0
    return 'arm' if arm_lower == lower_is_better else 'baseline'


def doubling_slope(points: Sequence[tuple[float, float]]) -> Optional[float]:
    """Least-squares drop of y per doubling of x (positive = y falls as x doubles); None for < 2 distinct x."""
    pts = [(math.log2(x), y) for x, y in points if x and x > 0 and y is not None]
    if len({x for x, _ in pts}) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return -sum((x - mx) * (y - my) for x, y in pts) / sxx
