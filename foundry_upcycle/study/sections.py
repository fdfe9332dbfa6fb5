"""The study report's sections as markdown lines: verdicts (with their test and interval), the held-out sets, the
learning rates, the regime, step times, router health. `study/report.py` puts them together."""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from foundry_upcycle.study import arms as arm_registry
from foundry_upcycle.study import stats
from foundry_upcycle.study.arms import label as arm_label
from foundry_upcycle.study.arms import short as arm_short
from foundry_upcycle.study.figures import ROUTER_FIGURE
from foundry_upcycle.study.results_view import arm_names, budgets_of, flop_ratio, num
from foundry_upcycle.study.verdicts import sentence

METRIC_NAMES = {'ce_domain': 'held-out domain CE', 'ce_generic': 'held-out generic CE (forgetting)',
                'core_average': 'core average'}


def fmt(x: Any, spec: str = '.4f') -> str:
    v = num(x)
    return 'n/a' if v is None else format(v, spec)


def fmt_int(x: Any) -> str:
    v = num(x)
    return 'n/a' if v is None else f'{int(v):,}'


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)] + ['| ' + ' | '.join(r) + ' |' for r in rows]




def comparison(results: Mapping[str, Any], arm: str, budget: float, metric: str) -> Optional[Mapping[str, Any]]:
    return (((results.get('comparisons') or {}).get(arm) or {}).get(f'{budget:g}') or {}).get(metric)


def ce_winner(results: Mapping[str, Any], budget: float, metric: str = 'ce_domain',
              arm: str = arm_registry.PRIMARY) -> tuple[str, str]:
    """(arm | baseline | 'tie' | 'n/a', a sentence with the interval and test) for one arm at one budget."""
    c = comparison(results, arm, budget, metric)
    labels = {a: arm_short(a) for a in arm_names(results)}
    if not c:
        return 'n/a', sentence(None, labels)
    return c['winner'], sentence(c, labels, 4 if metric.startswith('ce') else 3)


def verdict_lines(results: Mapping[str, Any], metric: str) -> list[str]:
    budgets = budgets_of(results)
    lines: list[str] = []
    base = arm_registry.BASELINE
    for arm in arm_names(results)[1:]:
        winners = {b: ce_winner(results, b, metric, arm) for b in budgets}
        tally = {w: sum(1 for v, _ in winners.values() if v == w) for w in (arm, base, 'tie', 'n/a')}
        lines += [f'- budget {b:g}: {text}' for b, (_, text) in winners.items()]
        lines += ['', f'{arm_label(arm)} ahead at {tally[arm]}, {arm_label(base)} ahead at {tally[base]}, tied at '
                  f'{tally["tie"]} of {len(budgets)} budgets' +
                  (f' ({tally["n/a"]} without a verdict)' if tally['n/a'] else '') + '.', '']
    return lines[:-1]


def test_lines() -> list[str]:
    return [f'Every verdict: {stats.TEST_NAME}. Per seed, the gap between the arms on the same held-out set (seed i '
            'gives both arms the same data order); the 95% interval adds the seeds\' spread (Student t, n - 1 df) '
            'and the held-out set\'s own noise (a delete-one-cluster jackknife over its documents for CE, binomial '
            'over the ICL examples for the core average), each at its own t. An arm is "ahead" only when the '
            'interval excludes 0; otherwise the arms tie. Its false-positive rate is at most 5% at 2 and 3 seeds '
            '(a simulation of two arms from one distribution, tests/test_stats.py); the former 2-standard-error '
            'rule fired 14-30% of the time at these seed counts.']


def eval_set_lines(results: Mapping[str, Any]) -> list[str]:
    sets = results.get('eval_sets') or {}
    data = (results.get('data') or {}).get('tokens') or {}
    out = []
    for name, what in (('domain', 'domain'), ('generic', 'generic')):
        s = sets.get(name)
        if not s:
            continue
        tokens = data.get(f'{name}/{s["split"]}')
        if s.get('documents'):
            clusters = len(set(s.get('clusters') or [])) or s['documents']
            out.append(f'- {what}: the **{s["split"]}** split, {s["documents"]} documents (excerpts of at most '
                       f'{(results.get("config") or {}).get("data", {}).get("eval_doc_chars", "?")} characters) '
                       f'from {clusters} source files or works' + (f', {tokens:,} tokens' if tokens else '') +
                       '; resampled by source (a work\'s excerpts together).')
        else:
            out.append(f'- {what}: the **{s["split"]}** split, in sequence blocks (no document boundaries known).')
    domain = sets.get('domain') or {}
    chose = 'the validation split chose the lrs; the test split chose nothing' if domain.get('split') == 'test' \
        else '**this split also chose the lrs** (your MDS data has no test/ split)'
    return ['Held-out sets (every number in the verdicts and tables comes from them): ' + chose + '.', '', *out]


def epoch_lines(results: Mapping[str, Any]) -> list[str]:
    rows = [(a['arm'], a['budget'], num(a.get('domain_epochs'))) for a in results['arms']]
    rows = [r for r in rows if r[2] is not None]
    if not rows:
        return []
    most = max(rows, key=lambda r: r[2])
    repeated = sorted({(a, b) for a, b, e in rows if e > 1})
    text = (f'Passes over the domain\'s training split: at most {most[2]:.2f} ({arm_short(most[0])} at budget '
            f'{most[1]:g}); ' + ', '.join(f'{arm_short(a)} {e:.2f} at {b:g}' for a, b, e in rows
                                          if b == max(r[1] for r in rows)) + ' at the largest budget. ')
    text += ('Every arm saw each training document at most once.' if not repeated else
             'Runs that repeat the domain split: ' + ', '.join(f'{arm_short(a)} @ {b:g}' for a, b in repeated) + '.')
    return [text]


def regime_lines(results: Mapping[str, Any]) -> list[str]:
    r = results.get('regime') or {}
    if not r:
        return ['The results do not record the regime.']
    tpp, chance, base = num(r.get('base_tokens_per_param')), num(r.get('chance_ce')), num(r.get('base_ce_domain'))
    slope = num(r.get('cpt_slope_per_doubling'))
    lo, hi = r.get('paper_tokens_per_param') or (100, 460)
    slo, shi = r.get('paper_cpt_slope_per_doubling') or (0.014, 0.025)
    lines = [f'**Regime: {r.get("label", "?")}.** '
             + ('This run is a test of the paper\'s claim (an over-trained, annealed dense base that knows the '
                'domain).' if r.get('tests_paper_claim') else
                'This run does NOT test the paper\'s claim: ' + '; '.join(r.get('why_not') or []) + '.'), '',
             '| | this study | the paper |', '|---|---|---|',
             f'| dense base: pretraining tokens per parameter | {fmt(tpp, ".1f")} | {lo}-{hi} |',
             f'| dense base: held-out domain CE vs chance ln V | {fmt(base, ".3f")} vs {fmt(chance, ".3f")} '
             f'(V = {fmt_int(r.get("vocab_size"))}) | far below chance |',
             f'| CPT: drop in held-out domain CE per doubling of tokens | {fmt(slope, ".3f")} | {slo}-{shi} |',
             '| phase-2 lr vs pretraining peak | ' + ', '.join(f'{k} {v:g}' for k, v in
                                                             (r.get('phase2_lrs') or {}).items())
             + f' vs {fmt(r.get("pretrain_lr"), "g")} | 5e-5 / 1e-4 vs a higher peak |', '']
    lines += [f'Deviation: {d}.' for d in r.get('deviations') or []]
    if slope is not None and slope > 2 * shi:
        lines.append(f'CPT still gains {slope:.3f} nats per doubling of tokens here, several times the paper\'s '
                     f'{slo}-{shi}: the arms are further from saturation than the paper\'s, so the upcycled arm\'s '
                     f'token deficit (ratio {fmt(results.get("token_ratio"), ".3f")}) costs it more than it would '
                     'there. Read the verdicts with that in mind.')
    return lines


def timing_lines(results: Mapping[str, Any]) -> list[str]:
    t = results.get('timing') or {}
    fr = flop_ratio(results)
    if not t or num(t.get('ratio')) is None:
        return ['Step times were not measured (timing off).']
    load = t.get('load_average_before'), t.get('load_average_after')
    text = (f'Measured step-time ratio, upcycled / CPT: **{t["ratio"]:.2f}** (median step '
            f'{1000 * t["step_time_s"]["upcycle"]:.0f} ms vs {1000 * t["step_time_s"]["cpt"]:.0f} ms; '
            f'{t.get("method", "")}) against a FLOP ratio of {fmt(fr, ".2f")}. Load average (1/5/15 min) before '
            f'{load[0]}, after {load[1]}, on {t.get("cpu_count")} CPUs' +
            (f'; this process had {100 * t["cpu_share"]:.0f}% of a core while stepping.' if t.get('cpu_share')
             is not None else '.'))
    if t.get('loaded'):
        text += (' **The machine was loaded while this was measured** (other work took this process\'s core): '
                 'the absolute times are pessimistic and the ratio is less reliable.')
    jobs = (results.get('wall_clock') or {}).get('jobs') or 1
    where = f'trained {jobs} at a time' if jobs > 1 else 'same machine'
    return [text, '', f'Per-run throughput (tokens/s, mean over seeds; wall-clock, {where}): ' + ', '.join(
        f'{arm_label(a["arm"])} @ {a["budget"]:g}: {fmt(a.get("tokens_per_s"), ",.0f")}' for a in results['arms']) + '.']


def router_lines(results: Mapping[str, Any], summary: Optional[Mapping[str, Any]]) -> list[str]:
    if summary is None:
        return ['No router metrics were logged (add the `upcycle_router_monitor` callback to the upcycling '
                'recipe\'s `callbacks:` to get the per-layer expert load, router entropy, expert spread and LBL).']
    lines = [f'![Router health]({ROUTER_FIGURE})', '']
    if summary['load'] and summary['experts']:
        uniform = 1 / len(summary['experts'])
        worst = max((max(row) for row in summary['load'] if row), default=float('nan'))
        lines.append(f'Final expert load at budget {summary["budget"]:g}: the most-loaded expert takes {worst:.3f} '
                     f'of its layer\'s assignments (uniform: {uniform:.3f}).')
    return lines


def lr_lines(results: Mapping[str, Any]) -> list[str]:
    lr = results.get('lr') or {}
    if not lr:
        return []
    names = arm_names(results)
    lines = ['Phase-2 learning rates: ' + ', '.join(f'{arm_short(a)} **{fmt(lr.get(a), "g")}**' for a in names) +
             f' (source: {lr.get("source")}).']
    sweep = lr.get('sweep')
    if not sweep:
        return lines + ['', 'No lr sweep ran (lrs given with --lr / --upcycle-lr, or --no-lr-sweep): nothing shows '
                        'that they are near each arm\'s optimum.']
    scores = {a: {x: ce for x, ce in sweep['scores'].get(a, [])} for a in names}
    grid = sorted({x for a in names for x in scores[a]})
    lines += ['', f'Each arm at every lr of its grid, budget {sweep["budget"]:g}, seed 0; {sweep["metric"]} = domain '
              f'CE on the **{sweep["split"]}** split (the test split chose nothing). Bold: the arm\'s choice; '
              'a grid whose best lr was at its edge was extended one step beyond it (at most twice).', '']
    rows = [[f'{x:.3g}'] + [('**' + fmt(scores[a][x]) + '**' if x == lr.get(a) else fmt(scores[a][x]))
                            if x in scores[a] else '' for a in names] for x in grid]
    lines += table(['lr'] + [arm_label(a) for a in names], rows) + ['']
    for a in names:
        where = ('**at the edge of its grid**: its optimum may lie outside it' if a in sweep.get('at_edge', [])
                 else 'an interior optimum of its grid (worse on both sides)')
        lines.append(f'- {arm_label(a)}: {lr.get(a):g}, {where}.')
    check = sweep.get('check')
    if check:
        where = ('and the grid neighbours on both sides' if check.get('mode') == 'both' else
                 'and one grid step above (the direction the optimum moves with the budget)')
        lines += ['', f'Check at the largest budget, {check["budget"]:g} (seed 0, validation): each arm at its choice '
                  f'{where}.', '']
        for a in names:
            row = ', '.join(f'{x:.3g}: {fmt(ce)}' for x, ce in check['scores'].get(a, []))
            cost = check['chosen_cost'].get(a)
            verdict = ('the choice is still the best of these' if not cost else
                       f'{check["best"][a]:.3g} is better by {cost:.4f} nats: the choice made at the shortest '
                       'budget under-tunes this arm at the largest')
            lines.append(f'- {arm_label(a)}: {row}; {verdict}.')
    return lines
