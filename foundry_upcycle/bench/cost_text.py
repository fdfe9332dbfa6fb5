"""The cost report as markdown: the section the study's report includes verbatim (`render_cost_section`)."""
from __future__ import annotations

from typing import Any, Optional

from .breakeven import FAR_EXTRAPOLATION


def _g(x: Optional[float], fmt: str = '.3g') -> str:
    return '—' if x is None else format(x, fmt)


def _tokens(be: Optional[dict[str, Any]], basis: str, ratio: bool = True) -> str:
    if be is None:
        return '—'
    t = be[f'tokens_{basis}']
    if t is None:
        return be[f'verdict_{basis}'].split(' (')[0]
    if t == 0:
        return '0 (CPT as good)'
    return f"{t:.3g} ({be[f'tokens_{basis}_per_training_token']:.3g}x)" if ratio else f'{t:.3g}'


def _status(be: dict[str, Any]) -> str:
    factor = be.get('extrapolation_factor')
    if be['status'] == 'extrapolated' and factor and factor > FAR_EXTRAPOLATION:
        return f'extrapolated {factor:.3g}x past the data, unreliable'
    return be['status']


def _match(be: Optional[dict[str, Any]]) -> str:
    if be is None:
        return '—'
    if be['extra_train_flops'] is None:
        return be['status']
    return f"+{be['extra_train_flops']:.3g} FLOPs (+{100 * be['extra_train_flops_ratio']:.0f}%), {_status(be)}"


def _gain_text(row: dict[str, Any], metric: str) -> str:
    ci = row.get(f'{metric}_gain_ci')
    return f'{row[f"{metric}_gain"]:.3g}' + (f' (95% CI [{ci[0]:.3g}, {ci[1]:.3g}])' if ci else '')


def _how(be: dict[str, Any], basis: str) -> str:
    """How a break-even was found: the CPT curve's status (interpolated between measured runs, extrapolated, ...)."""
    status = be.get('seconds_status') if basis == 'seconds' else be['status']
    return {'interpolated': 'interpolated between measured CPT runs',
            'not_needed': 'measured: CPT at this budget is already as good',
            'extrapolated': _status(be) if basis != 'seconds' else 'extrapolated past the largest CPT run'}.get(
        status, str(status))


def _break_even_text(be: dict[str, Any]) -> str:
    flops = f'{_tokens(be, "flops", False)} tokens processed by FLOPs ({_how(be, "flops")})'
    if be.get('seconds_status') == 'missing':
        return (f'{flops}. The seconds basis is missing: results.json has no training seconds for every run, so no '
                'break-even in measured time is given')
    return (f'{flops}, or {_tokens(be, "seconds", False)} tokens processed by measured training and serving seconds '
            f'(the CPT seconds needed {_how(be, "seconds")})')


def _decision(row: dict[str, Any], metric: str) -> str:
    """One budget's decision. A tie (the study's test finds no difference) is called a tie, never a win."""
    be = row['break_even'][metric]
    b = f"{row['budget']:g}x"
    verdict = row.get(f'{metric}_verdict', 'n/a')
    if be is None or row.get(f'{metric}_gain') is None:
        return f'- {b}: no {metric} for both arms.'
    test = row.get(f'{metric}_test') or 'no test'
    if verdict == 'tie':
        return (f'- {b}: a tie on {metric}: upcycling - CPT gain {_gain_text(row, metric)} is inside the noise '
                f'({test}). Neither arm is better, so no quality is bought: the dense CPT model is the cheaper one '
                'to serve.')
    if verdict == 'cpt' or be['status'] == 'not_needed':
        return f'- {b}: CPT is as good or better on {metric}; the dense CPT model is cheaper at any demand.'
    if verdict == 'n/a':
        return (f'- {b}: no verdict on {metric} (no noise estimate: one seed); upcycling\'s mean is better by '
                f'{_gain_text(row, metric)}, which this study cannot tell from noise.')
    ahead = f'- {b}: upcycling is ahead on {metric} by {_gain_text(row, metric)} ({test})'
    if be['status'] == 'never':
        return f'{ahead}, and CPT cannot catch up ({be["note"]}); the extra inference cost is the price of that quality.'
    if be['status'] == 'unknown':
        return f'{ahead}; {be["note"]}.'
    return (f'{ahead}. CPT matches it with {_match(be)}; so beyond {_break_even_text(be)}, the longer-trained dense '
            'model is cheaper overall, below that the upcycled one.')


def render_cost_section(cost: dict[str, Any]) -> str:
    """The report section (markdown) the study's report includes verbatim."""
    inf, metric = cost['inference'], cost['primary_metric']
    wl = inf['workload']
    lines = [
        '## Inference cost: upcycling vs continued pretraining',
        '',
        f"The upcycled MoE (top-{cost['top_k']}) processes {inf['moe_tokens_per_s']:,.1f} vs the dense model's "
        f"{inf['dense_tokens_per_s']:,.1f} {inf['metric'].replace('_per_s', '').replace('_', ' ')}/s "
        f"(engine {inf['engine']}, {inf['device']}, {wl['input_tokens']} in / {wl['output_tokens']} out; tokens "
        f"processed = prompt + generated): {100 * inf['extra_cost']:+.1f}% time per token, measured "
        f"({inf['extra_seconds_per_token']:.3g} s more per token). By FLOPs: "
        f"{100 * cost['budgets'][0]['extra_cost_per_token']['flops']:+.1f}%.",
        '',
        f'**Decision** (quality metric: {metric}; break-even = lifetime tokens processed beyond which the dense '
        'CPT model, trained longer to the same quality, is cheaper overall; three bases, see Assumptions):',
        '',
        *[_decision(row, metric) for row in cost['budgets']],
        '',
        '| budget | domain CE: CPT → upcycled (gain) | core avg: CPT → upcycled (gain) '
        '| CE gain per +10% cost (measured / FLOPs) | extra CPT compute to match CE '
        '| break-even tokens, seconds (x CPT train tokens) | break-even, FLOPs | break-even, throughput in FLOPs |',
        '|---|---|---|---|---|---|---|---|',
    ]
    for row in cost['budgets']:
        per = row['quality_per_extra_cost']
        be = row['break_even'][metric]
        lines.append(
            f"| {row['budget']:g}x | {row['cpt']['ce_domain']:.4g} → {row['upcycle']['ce_domain']:.4g} "
            f"({_g(row['ce_domain_gain'], '+.3g')}) "
            f"| {_g(row['cpt']['core_average'], '.4g')} → {_g(row['upcycle']['core_average'], '.4g')} "
            f"({_g(row['core_average_gain'], '+.3g')}) "
            f"| {_g(_tenth(per['seconds']['ce_domain']))} / {_g(_tenth(per['flops']['ce_domain']))} "
            f"| {_match(be)} | {_tokens(be, 'seconds')} | {_tokens(be, 'flops')} | {_tokens(be, 'throughput')} |")
    if any(row['break_even'].get('core_average') for row in cost['budgets']):
        lines += ['', 'Same break-even on the core average:', '',
                  '| budget | extra CPT compute to match | break-even tokens, seconds | break-even tokens, FLOPs |',
                  '|---|---|---|---|']
        for row in cost['budgets']:
            be = row['break_even'].get('core_average')
            lines.append(f"| {row['budget']:g}x | {_match(be)} | {_tokens(be, 'seconds')} "
                         f"| {_tokens(be, 'flops')} |")
    else:
        lines += ['', 'No core average for both arms: no break-even on it.']
    lines += ['', '### Assumptions', '', *[f'- {a}' for a in cost['assumptions']]]
    if cost['warnings']:
        lines += ['', '### Caveats', '', *[f'- {w}' for w in cost['warnings']]]
    return '\n'.join(lines) + '\n'


def _tenth(x: Optional[float]) -> Optional[float]:
    return None if x is None else x / 10.0
