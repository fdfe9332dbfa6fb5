"""The study's paired test: its false-positive rate on two arms drawn from one distribution is at most its nominal
5% at 2 and 3 seeds (a simulation), it finds a real gap, and its pieces (t quantiles, the jackknife) are right."""
from __future__ import annotations

import math
import random

import pytest

from foundry_upcycle.study import stats

TRIALS = 3000
# Monte-Carlo slack: 3 standard errors of a 5% rate over TRIALS trials
SLACK = 3 * math.sqrt(0.05 * 0.95 / TRIALS)


def simulate(rng: random.Random, seeds: int, seed_sd: float, noise_sd: float, doc_sd: float,
             docs: int = 60, gap: float = 0.0) -> tuple[list, list, list]:
    """Per-seed [[nll, tokens], ...] of two arms on the same held-out documents. Document difficulty is shared by
    both arms (the pairing); each run has its own seed offset (seed_sd) and each (run, document) its own noise
    (noise_sd); the arm's advantage differs by document (doc_sd, mean 0 unless `gap`): a fresh draw of documents
    would move the gap even with infinitely many seeds."""
    clusters = [f'c{k // 2}' for k in range(docs)]                   # two excerpts per source file
    difficulty = [rng.gauss(3.7, 0.3) for _ in range(docs)]
    interaction = [rng.gauss(0, doc_sd) for _ in range(docs)]
    tokens = [rng.randint(600, 1000) for _ in range(docs)]
    out = []
    for arm, shift in enumerate((gap, 0.0)):
        runs = []
        for _ in range(seeds):
            offset = rng.gauss(0, seed_sd) + shift
            runs.append([[(difficulty[k] + offset + (interaction[k] if arm == 0 else 0.0) + rng.gauss(0, noise_sd))
                          * tokens[k], tokens[k]] for k in range(docs)])
        out.append(runs)
    return out[0], out[1], clusters


@pytest.mark.parametrize('seeds', [2, 3])
@pytest.mark.parametrize('seed_sd, noise_sd, doc_sd', [
    (0.004, 0.0005, 0.0),      # seeds dominate
    (0.003, 0.006, 0.0),
    (0.001, 0.003, 0.01),      # all three
    (0.0, 0.0, 0.03),          # only the documents: a fresh draw of documents is the only noise
])
def test_false_positive_rate_is_at_most_nominal(seeds, seed_sd, noise_sd, doc_sd):
    rng = random.Random(1000 * seeds + int(1e4 * seed_sd) + int(1e3 * doc_sd))
    hits = 0
    for _ in range(TRIALS):
        a, b, clusters = simulate(rng, seeds, seed_sd, noise_sd, doc_sd)
        hits += stats.verdict(stats.paired_ce_gap(a, b, clusters), lower_is_better=True) != 'tie'
    assert hits / TRIALS <= stats.ALPHA + SLACK, f'false-positive rate {hits / TRIALS:.3f} at {seeds} seeds'


def test_the_two_standard_error_rule_would_fail_the_same_check():
    """The old rule (|gap| > 2 SE) on the same simulation: far above 5% at 2 seeds. The check has teeth."""
    rng = random.Random(7)
    hits = 0
    for _ in range(TRIALS):
        a, b, clusters = simulate(rng, 2, 0.004, 0.0005, 0.0)
        t = stats.paired_ce_gap(a, b, clusters)
        hits += abs(t['gap']) > 2 * t['se']
    assert hits / TRIALS > 0.15


def test_a_real_gap_is_found_with_its_interval():
    rng = random.Random(3)
    a, b, clusters = simulate(rng, 3, 0.002, 0.002, 0.01, gap=-0.03)
    t = stats.paired_ce_gap(a, b, clusters)
    assert stats.verdict(t, lower_is_better=True) == 'arm' and t['ci'][0] < -0.03 < t['ci'][1] < 0
    assert t['n_seeds'] == 3 and t['eval_units'] == 30 and t['df_seeds'] == 2 and t['df_eval'] == 29
    assert t['se_eval'] > 0.0005                                          # the documents' share of the noise
    assert stats.verdict(t, lower_is_better=False) == 'baseline'          # higher is better: the arm is behind


# Student t quantiles from printed tables (Abramowitz & Stegun 26.10 / any statistics text): (p, df, t)
T_TABLE = [(0.975, 1, 12.7062047), (0.975, 2, 4.30265273), (0.975, 3, 3.18244631), (0.975, 10, 2.22813885),
           (0.975, 30, 2.04227246), (0.95, 5, 2.01504837), (0.995, 4, 4.60409487), (0.975, 1000, 1.96233908),
           (0.975, math.inf, 1.95996398)]


@pytest.mark.parametrize('p, df, want', T_TABLE)
def test_t_quantile_matches_the_tables_without_scipy(p, df, want):
    assert stats.t_quantile(p, df) == pytest.approx(want, rel=2e-8)
    assert stats.t_quantile(1 - p, df) == pytest.approx(-want, rel=2e-8)
    assert stats.t_cdf(want, df) == pytest.approx(p, abs=1e-9)


def test_t_quantile_matches_scipy_at_fractional_df():
    t = pytest.importorskip('scipy.stats', reason='scipy not installed: the table test covers t_quantile').t
    for df in (0.5, 1, 1.5, 2, 2.7, 4, 7.3, 29, 81, 400, 1e5, math.inf):
        for p in (0.6, 0.9, 0.975, 0.995, 0.9995, 0.025):
            assert stats.t_quantile(p, df) == pytest.approx(float(t.ppf(p, df)), rel=1e-9, abs=1e-12), (p, df)
    with pytest.raises(ValueError, match='t_quantile'):
        stats.t_quantile(1.0, 3)


def test_pieces():
    assert stats.t_quantile(0.975, 1) == pytest.approx(12.706, abs=1e-3)
    assert stats.t_quantile(0.975, 2) == pytest.approx(4.303, abs=1e-3)
    # jackknife of a difference of means with one document per cluster and identical seeds: seed variance 0, and
    # the eval variance equals the classic jackknife of the mean per-document difference
    docs_a = [[[1.0, 1], [2.0, 1], [4.0, 1]]] * 2
    docs_b = [[[1.0, 1], [1.0, 1], [1.0, 1]]] * 2
    t = stats.paired_ce_gap(docs_a, docs_b, ['x', 'y', 'z'])
    diffs = [0.0, 1.0, 3.0]
    mean = sum(diffs) / 3
    assert t['gap'] == pytest.approx(mean) and t['se_seeds'] == 0
    assert t['se_eval'] ** 2 == pytest.approx(sum((d - mean) ** 2 for d in diffs) / 2 / 3)
    assert stats.paired_ce_gap(docs_a[:1], docs_b[:1], ['x', 'y', 'z']) is None       # one seed: no verdict
    g = stats.paired_gap([0.1, 0.3], [0.0, 0.0], var_eval=0.0)
    assert g['gap'] == pytest.approx(0.2) and g['df_seeds'] == 1
    assert g['ci'][0] == pytest.approx(0.2 - 12.706 * 0.1, abs=1e-3)
    s = stats.summary([1.0, 2.0, 3.0])
    assert s['mean'] == 2.0 and s['std'] == pytest.approx(1.0) and s['sem'] == pytest.approx(1 / math.sqrt(3))
    bench = {'t': ('cat', 0, 0.25)}          # one task at acc 0.5 (baseline 0.25) on 100 examples, one category
    se = stats.core_average_binomial_se({'t': (0.5 - 0.25) / 0.75}, {'t': 100}, bench)
    assert se == pytest.approx(math.sqrt(0.25 / 100) / 0.75)
    assert stats.doubling_slope([(1, 5.0), (2, 4.9), (4, 4.8)]) == pytest.approx(0.1)
