"""The report's variants section: each upcycling variant against CPT and against the paper's recipe, per budget,
with its interval and verdict (results.json `comparisons` and `comparisons_vs_paper`, whatever test they carry)."""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from foundry_upcycle.study import arms as arm_registry
from foundry_upcycle.study.arms import label as arm_label
from foundry_upcycle.study.results_view import arm_names, budgets_of, find_arm, num

METRICS = (('ce_domain', 'held-out domain CE', '.4f'), ('core_average', 'core average', '.3f'))


def _comparison(results: Mapping[str, Any], key: str, arm: str, budget: float, metric: str) -> Optional[Mapping]:
    return (((results.get(key) or {}).get(arm) or {}).get(f'{budget:g}') or {}).get(metric)


def interval(c: Optional[Mapping[str, Any]], spec: str) -> str:
    """'gap [lo, hi] verdict' of one comparison: the test's own interval (`ci`, the paired test's 95% interval), else
    (results from before the paired test) gap ± 2 SE."""
    if not c or num(c.get('gap')) is None:
        return 'n/a'
    gap = c['gap']
    if isinstance(c.get('ci'), (list, tuple)) and len(c['ci']) == 2 and all(num(x) is not None for x in c['ci']):
        lo, hi = c['ci']
    elif num(c.get('se')) is not None:
        lo, hi = gap - 2 * c['se'], gap + 2 * c['se']
    else:
        return f'{gap:+{spec}} (no noise estimate)'
    winner = c.get('winner')
    verdict = 'tie' if winner in ('tie', 'within noise') else 'n/a' if winner in (None, 'n/a') else \
        f'{arm_registry.short(winner)} ahead'
    return f'{gap:+{spec}} [{lo:+{spec}}, {hi:+{spec}}] {verdict}'


def _mean(entry: Optional[Mapping[str, Any]], metric: str, spec: str) -> str:
    if not entry:
        return 'missing'
    mean = num(((entry.get('eval') or {}).get(metric)))
    std = num((entry.get('eval_std') or {}).get(metric))
    if mean is None:
        return 'n/a'
    return f'{mean:{spec}}' + (f' ± {std:{spec}}' if std is not None else '') + f' ({entry.get("n_seeds", 1)})'


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)] + ['| ' + ' | '.join(r) + ' |' for r in rows]


def variant_arms(results: Mapping[str, Any]) -> list[str]:
    """The study's arms besides CPT and the paper's recipe."""
    return [a for a in arm_names(results) if a not in (arm_registry.BASELINE, arm_registry.PRIMARY)]


def router_figure(arm: str) -> str:
    return f'router_{arm}.png'


def variant_lines(results: Mapping[str, Any], router_figures: bool = False) -> list[str]:
    """The section's markdown lines; [] for a study without variants (only CPT and the paper's recipe).
    router_figures: the runs logged router health (`router_<arm>.png` written beside the report)."""
    names = variant_arms(results)
    if not names:
        return []
    cpt = {b: find_arm(results, arm_registry.BASELINE, b) for b in budgets_of(results)}
    lines = ['Each variant is the paper\'s recipe plus one `upcycle:` key, trained at the same matched FLOPs and '
             'seeds, its lr chosen by the same rule. Gap = variant - reference (CE: negative is better; core average: '
             'positive is better) with its 95% interval from the study\'s paired test (seeds paired; the held-out '
             'set\'s own noise included, see the verdict sections); "ahead" only where the interval excludes 0, '
             'otherwise a tie.', '']
    for metric, title, spec in METRICS:
        rows = []
        for b in budgets_of(results):
            for arm in [arm_registry.PRIMARY] + names:
                entry = find_arm(results, arm, b)
                ratio = (num((entry or {}).get('tokens')) or 0) / (num((cpt[b] or {}).get('tokens')) or 1)
                params = (f'{int(entry["active_params"]):,} / {int(entry["total_params"]):,}'
                          if entry and entry.get('active_params') else 'n/a')
                vs_paper = '(reference)' if arm == arm_registry.PRIMARY else \
                    interval(_comparison(results, 'comparisons_vs_paper', arm, b, metric), spec)
                rows.append([f'{b:g}', arm_label(arm), f'{ratio:.3f}', params, _mean(entry, metric, spec),
                             interval(_comparison(results, 'comparisons', arm, b, metric), spec), vs_paper])
        lines += [f'**{title}** (mean ± std over seeds, n):', '']
        lines += _table(['budget', 'arm', 'tokens / CPT\'s', 'active / total params', f'{title}', 'vs CPT',
                         'vs paper\'s recipe'], rows)
        lines.append('')
    if router_figures:
        lines += ['Router health of each variant at the largest budget (seed 0), as `router.png` for the paper\'s '
                  'recipe (a fine-grained model has E*G experts; an MoE on some blocks shows its MoE blocks only):', '']
        lines += [f'![{arm_label(a)}]({router_figure(a)})' for a in names] + ['']
    return lines[:-1]
