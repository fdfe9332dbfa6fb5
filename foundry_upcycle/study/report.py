"""The study report: `report.md` and PNG plots from a results.json (schema 2, see study/results.py).

Plots (Matplotlib, object API, no pyplot state):
- figure1_upcycle_vs_cpt.png: the paper's Figure 1, relative core-average gain of upcycling over CPT and final
  cross-entropy of both arms (mean over seeds, error bars: 2 standard errors) against the training budget;
- figure4_core_average.png: the paper's Figure 4, absolute core average of both arms and the dense baseline;
- loss_curves.png: training loss of both arms (seed 0), one panel per budget;
- throughput.png: interleaved, warmed-up step times of both arms and their ratio against the FLOP ratio;
- router.png (when the runs logged `router/...` through the `upcycle_router_monitor` callback): per-layer expert
  load heatmap at the end of the largest budget's upcycled run, and router entropy / expert spread / LBL curves.

A winner is named only when the gap exceeds twice its standard error (results['comparisons']).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from foundry_upcycle.atomic import atomic_write

SCHEMA = 2
ARMS = ('cpt', 'upcycle')
LABEL = {'cpt': 'CPT (dense)', 'upcycle': 'upcycled (MoE)', 'dense': 'dense base (before CPT / upcycling)'}
COLOR = {'cpt': '#1f77b4', 'upcycle': '#d62728', 'dense': '#444444'}
BUDGET_AXIS = 'training budget (fraction of the dense pretraining FLOPs)'
# Below this chance-normalised score a relative change divides by noise.
MIN_BASE_FOR_RELATIVE = 0.01
TINY_PARAMS = 100_000_000     # below this the report warns that gauntlet scores are near chance
FIGURES = {
    'figure1': 'figure1_upcycle_vs_cpt.png',
    'figure4': 'figure4_core_average.png',
    'loss': 'loss_curves.png',
    'throughput': 'throughput.png',
}
ROUTER_FIGURE = 'router.png'
VERDICT = {'upcycle': 'upcycled ahead', 'cpt': 'CPT ahead', 'within noise': 'within noise', 'n/a': 'no verdict'}


# ------------------------------------------------------------------------------------------------ reading


def _num(x: Any) -> Optional[float]:
    """A finite float, or None for missing / non-numeric / NaN values."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return float(x)


def _eval(entry: Optional[Mapping[str, Any]], key: str) -> Optional[float]:
    return _num(((entry or {}).get('eval') or {}).get(key))


def check_results(results: Any) -> None:
    """ValueError naming what is wrong when `results` does not follow schema 2."""
    if not isinstance(results, Mapping):
        raise ValueError(f'results: expected a mapping (results.json object), got {type(results).__name__}')
    if results.get('schema') != SCHEMA:
        raise ValueError(f'results.schema is {results.get("schema")!r}; this report reads schema {SCHEMA}')
    if not isinstance(results.get('budgets'), list) or not results['budgets'] \
            or any(_num(b) is None for b in results['budgets']):
        raise ValueError(f'results.budgets must be a non-empty list of numbers, got {results.get("budgets")!r}')
    if not isinstance(results.get('arms'), list):
        raise ValueError('results.arms must be a list')
    for i, arm in enumerate(results['arms']):
        if not isinstance(arm, Mapping) or arm.get('arm') not in ARMS or _num(arm.get('budget')) is None:
            raise ValueError(f'results.arms[{i}] needs arm in {ARMS} and a numeric budget, got {arm!r}')


def _arm(results: Mapping[str, Any], arm: str, budget: float) -> Optional[Mapping[str, Any]]:
    return next((a for a in results['arms'] if a['arm'] == arm and math.isclose(a['budget'], budget)), None)


def _budgets(results: Mapping[str, Any]) -> list[float]:
    return sorted(float(b) for b in results['budgets'])


def relative_gain(upcycle: Optional[float], cpt: Optional[float]) -> Optional[float]:
    """(upcycle - cpt) / cpt in percent; None when either is missing or CPT is at chance (<= 0.01)."""
    if upcycle is None or cpt is None or cpt <= MIN_BASE_FOR_RELATIVE:
        return None
    return 100.0 * (upcycle - cpt) / cpt


def ce_winner(results: Mapping[str, Any], budget: float, metric: str = 'ce_domain') -> tuple[str, str]:
    """('cpt' | 'upcycle' | 'within noise' | 'n/a', a sentence) for one budget, by the 2-standard-error rule."""
    c = ((results.get('comparisons') or {}).get(f'{budget:g}') or {}).get(metric)
    if not c or c.get('upcycle') is None or c.get('cpt') is None:
        return 'n/a', 'not measured (an arm or its value is missing)'
    fmt = '.4f' if metric.startswith('ce') else '.3f'
    values = f'{c["upcycle"]:{fmt}} (upcycled) vs {c["cpt"]:{fmt}} (CPT)'
    gap = abs(c['upcycle'] - c['cpt'])
    if c['winner'] == 'n/a':
        return 'n/a', f'{values}: no noise estimate (one seed), no verdict'
    se = f'gap {gap:{fmt}}, 2 SE = {2 * c["se"]:{fmt}}'
    if c['winner'] == 'within noise':
        return 'within noise', f'within noise: {values}, {se}'
    return c['winner'], f'**{LABEL[c["winner"]]}** ahead: {values}, {se}'


def _err(entry: Optional[Mapping[str, Any]], metric: str) -> Optional[float]:
    """2 x the standard error of an arm's mean (for error bars), or None."""
    if not entry:
        return None
    if metric == 'core_average':
        b = _num(entry.get('core_average_binomial_se'))
        s = _num((entry.get('eval_sem') or {}).get(metric)) or 0.0
        return None if b is None else 2 * math.sqrt(b * b + s * s)
    s = _num((entry.get('eval_sem') or {}).get(metric))
    return None if s is None else 2 * s


# ------------------------------------------------------------------------------------------------ plots


def _series(results, arm: str, key_fn) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for b in _budgets(results):
        y = key_fn(_arm(results, arm, b))
        if y is not None:
            xs.append(b)
            ys.append(y)
    return xs, ys


def _budget_axis(ax, results) -> None:
    budgets = _budgets(results)
    pad = 0.07 * ((budgets[-1] - budgets[0]) or 1.0)
    ax.set_xlim(budgets[0] - pad, budgets[-1] + pad)
    ax.set_xlabel(BUDGET_AXIS)
    ax.set_xticks(budgets)
    ax.set_xticklabels([f'{b:g}' for b in budgets])
    ax.grid(True, alpha=0.3)


def _legend_below(ax) -> None:
    ax.legend(loc='upper center', bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8, frameon=False)


def _new_figure(ncols: int, nrows: int = 1, width: float = 6.0, height: float = 4.4):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width * ncols, height * nrows), layout='constrained')
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig, path: Path) -> None:
    atomic_write(str(path), lambda tmp: fig.savefig(tmp, format='png', dpi=110))


def plot_figure1(results: Mapping[str, Any], path: Path) -> None:
    fig, axes = _new_figure(2)
    ax = axes[0][0]
    xs, gains, na = [], [], []
    for b in _budgets(results):
        g = relative_gain(*(_eval(_arm(results, a, b), 'core_average') for a in ('upcycle', 'cpt')))
        if g is None:
            na.append(b)
        else:
            xs.append(b)
            gains.append(g)
    ax.axhline(0, color='black', lw=0.8)
    if xs:
        ax.plot(xs, gains, 'o-', color=COLOR['upcycle'], lw=2, label='upcycled vs CPT')
    for b in na:
        ax.annotate('n/a', (b, 0), textcoords='offset points', xytext=(0, 8), ha='center', color='gray')
    ax.set_ylabel('relative core-average gain of upcycled over CPT (%)')
    ax.set_title('Core average: upcycled vs CPT\n(n/a: missing, or CPT at chance level)')
    _budget_axis(ax, results)
    if xs:
        ax.legend(loc='best')
    ax = axes[0][1]
    for arm in ARMS:
        bx, by = _series(results, arm, lambda a: _eval(a, 'ce_domain'))
        errs = [_err(_arm(results, arm, b), 'ce_domain') or 0.0 for b in bx]
        if bx:
            ax.errorbar(bx, by, yerr=errs, fmt='o-', color=COLOR[arm], capsize=3,
                        label=f'{LABEL[arm]}: held-out domain CE (bars: 2 SE over seeds)')
        bx, by = _series(results, arm, lambda a: _num((a or {}).get('train_ce_final')))
        if bx:
            ax.plot(bx, by, 's--', color=COLOR[arm], alpha=0.6, label=f'{LABEL[arm]}: final train CE (last 5%)')
    dense_ce = _eval(results.get('dense'), 'ce_domain')
    if dense_ce is not None:
        ax.axhline(dense_ce, color=COLOR['dense'], ls=':', label=f'{LABEL["dense"]}: held-out domain CE')
    ax.set_ylabel('cross-entropy (nats/token, lower is better)')
    ax.set_title('Final cross-entropy of both arms')
    _budget_axis(ax, results)
    _legend_below(ax)
    fig.suptitle('Figure 1: upcycling vs continued pretraining at matched training FLOPs')
    _save(fig, path)


def plot_figure4(results: Mapping[str, Any], path: Path) -> None:
    fig, axes = _new_figure(1, width=7.0)
    ax = axes[0][0]
    for arm in ARMS:
        bx, by = _series(results, arm, lambda a: _eval(a, 'core_average'))
        errs = [_err(_arm(results, arm, b), 'core_average') or 0.0 for b in bx]
        if bx:
            ax.errorbar(bx, by, yerr=errs, fmt='o-', color=COLOR[arm], lw=2, capsize=3,
                        label=f'{LABEL[arm]} (bars: 2 SE, binomial + seeds)')
    dense = _eval(results.get('dense'), 'core_average')
    if dense is not None:
        ax.axhline(dense, color=COLOR['dense'], ls='--', label=LABEL['dense'])
    ax.axhline(0, color='gray', lw=0.8, ls=':', label='random guessing (0)')
    ax.set_ylabel('eval gauntlet core average (chance-normalised accuracy)')
    ax.set_title('Figure 4: core average of both arms and the dense base')
    _budget_axis(ax, results)
    ax.legend(loc='best')
    _save(fig, path)


def _smooth(ys: Sequence[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y - (ys[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def plot_loss_curves(results: Mapping[str, Any], path: Path) -> None:
    budgets = _budgets(results)
    ncols = min(3, len(budgets))
    nrows = math.ceil(len(budgets) / ncols)
    fig, axes = _new_figure(ncols, nrows, width=5.2, height=3.8)
    for i, b in enumerate(budgets):
        ax = axes[i // ncols][i % ncols]
        for arm in ARMS:
            a = _arm(results, arm, b) or {}
            curve = [(s, l) for s, l in (a.get('loss_curve') or []) if _num(l) is not None]
            steps, tokens = _num(a.get('steps')), _num(a.get('tokens'))
            per_step = tokens / steps if steps and tokens else None
            if not curve:
                continue
            xs = [s * per_step if per_step else s for s, _ in curve]
            ys = [float(l) for _, l in curve]
            ax.plot(xs, ys, color=COLOR[arm], alpha=0.25, lw=0.8)
            ax.plot(xs, _smooth(ys, max(1, len(ys) // 20)), color=COLOR[arm], lw=2, label=f'{LABEL[arm]}')
            unit = 'training tokens' if per_step else 'training steps'
            ax.set_xlabel(unit)
        ax.set_title(f'budget {b:g} x pretraining FLOPs')
        ax.set_ylabel('training loss (nats/token)')
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(loc='upper right', fontsize=8)
        else:
            ax.text(0.5, 0.5, 'no loss curve recorded', ha='center', va='center', transform=ax.transAxes)
    for j in range(len(budgets), nrows * ncols):
        axes[j // ncols][j % ncols].set_visible(False)
    fig.suptitle('Training loss of both arms (faint: per step, bold: moving average)')
    _save(fig, path)


def flop_ratio(results: Mapping[str, Any]) -> Optional[float]:
    """Per-token training FLOPs of the upcycled model over the dense one (= expected step-time ratio)."""
    fpts = {}
    for arm in ARMS:
        fpts[arm] = next((_num(a.get('flops_per_token')) for a in results['arms']
                          if a['arm'] == arm and _num(a.get('flops_per_token'))), None)
    if fpts['cpt'] is None or fpts['upcycle'] is None:
        ratio = _num(results.get('token_ratio'))
        return 1 / ratio if ratio else None
    return fpts['upcycle'] / fpts['cpt']


def plot_throughput(results: Mapping[str, Any], path: Path) -> None:
    fig, axes = _new_figure(2)
    timing = results.get('timing') or {}
    steps = timing.get('steps_s') or {}
    ax = axes[0][0]
    for k, arm in enumerate(ARMS):
        ts = [1000 * t for t in steps.get(arm, [])]
        if ts:
            ax.plot(range(1, len(ts) + 1), ts, 'o-', color=COLOR[arm], label=f'{LABEL[arm]}: median '
                    f'{1000 * timing["step_time_s"][arm]:.0f} ms')
    ax.set_xlabel('measured step (after warm-up; arms interleaved)')
    ax.set_ylabel('step time (ms)')
    loaded = ' - LOADED MACHINE' if timing.get('loaded') else ''
    ax.set_title(f'Training step times, same batch, same process{loaded}')
    ax.grid(True, alpha=0.3)
    if ax.lines:
        _legend_below(ax)
    else:
        ax.text(0.5, 0.5, 'not measured', ha='center', va='center', transform=ax.transAxes)
    ax = axes[0][1]
    labels, values, colors = [], [], []
    if _num(timing.get('ratio')) is not None:
        labels.append('measured\n(median steps)')
        values.append(timing['ratio'])
        colors.append(COLOR['upcycle'])
    fr = flop_ratio(results)
    if fr is not None:
        labels.append('FLOPs per token')
        values.append(fr)
        colors.append('#777777')
    ax.bar(labels, values, color=colors)
    for i, v in enumerate(values):
        ax.annotate(f'{v:.2f}', (i, v), textcoords='offset points', xytext=(0, 3), ha='center')
    ax.axhline(1, color='gray', ls=':', lw=0.8)
    ax.set_ylabel('upcycled / CPT (x)')
    ax.set_title('Step-time ratio vs FLOP ratio')
    ax.grid(True, axis='y', alpha=0.3)
    _save(fig, path)


def _router_series(entry: Mapping[str, Any]) -> dict[str, list]:
    return (entry or {}).get('router') or {}


def router_summary(results: Mapping[str, Any]) -> Optional[dict[str, Any]]:
    """The largest budget's upcycled run (seed 0): final load per layer and expert, and the curves; None if the
    runs did not log `router/...` (the `upcycle_router_monitor` callback was not in the recipe)."""
    top = max(_budgets(results))
    series = _router_series(_arm(results, 'upcycle', top))
    if not series:
        return None
    import re
    load: dict[int, dict[int, float]] = {}
    curves: dict[str, dict[int, list]] = {'entropy': {}, 'expert_spread': {}, 'lbl': {}}
    for name, pts in series.items():
        m = re.fullmatch(r'layer(\d+)/load/expert(\d+)', name)
        if m and pts:
            load.setdefault(int(m.group(1)), {})[int(m.group(2))] = pts[-1][1]
            continue
        m = re.fullmatch(r'layer(\d+)/(entropy|expert_spread|lbl)', name)
        if m:
            curves[m.group(2)][int(m.group(1))] = pts
    total_lbl = series.get('lbl')
    layers = sorted(load)
    experts = sorted({e for v in load.values() for e in v})
    matrix = [[load[i].get(e, float('nan')) for e in experts] for i in layers]
    return {'budget': top, 'layers': layers, 'experts': experts, 'load': matrix, 'curves': curves,
            'lbl_total': total_lbl}


def plot_router(summary: Mapping[str, Any], path: Path) -> None:
    fig, axes = _new_figure(4, width=4.4, height=3.8)
    ax = axes[0][0]
    if summary['load']:
        im = ax.imshow(summary['load'], aspect='auto', cmap='viridis', vmin=0)
        fig.colorbar(im, ax=ax, label='fraction of assignments')
        ax.set_xticks(range(len(summary['experts'])))
        ax.set_xticklabels([str(e) for e in summary['experts']])
        ax.set_yticks(range(len(summary['layers'])))
        ax.set_yticklabels([str(i) for i in summary['layers']])
        if summary['experts']:
            ax.set_title(f'expert load at the end (uniform = {1 / len(summary["experts"]):.3f})')
    ax.set_xlabel('expert')
    ax.set_ylabel('layer')
    for ax, (key, title) in zip(axes[0][1:], (('entropy', 'router entropy (nats)'),
                                              ('expert_spread', 'expert spread from the dense copy'),
                                              ('lbl', 'load-balancing loss'))):
        for layer, pts in sorted(summary['curves'][key].items()):
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=f'layer {layer}')
        if key == 'lbl' and summary.get('lbl_total'):
            pts = summary['lbl_total']
            ax.plot([p[0] for p in pts], [p[1] for p in pts], 'k--', label='all layers')
        ax.set_xlabel('step')
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(f'Router health, upcycled run at budget {summary["budget"]:g} (seed 0)')
    _save(fig, path)


# ------------------------------------------------------------------------------------------------ markdown


def _f(x: Any, spec: str = '.4f') -> str:
    v = _num(x)
    return 'n/a' if v is None else format(v, spec)


def _int(x: Any) -> str:
    v = _num(x)
    return 'n/a' if v is None else f'{int(v):,}'


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)] + ['| ' + ' | '.join(r) + ' |' for r in rows]


def _pm(entry: Optional[Mapping[str, Any]], metric: str, spec: str = '.4f') -> str:
    """'mean ± std (n)' of an eval metric over seeds."""
    if not entry:
        return 'n/a'
    mean = _eval(entry, metric)
    std = _num((entry.get('eval_std') or {}).get(metric))
    n = entry.get('n_seeds') or 1
    if mean is None:
        return 'n/a'
    return f'{mean:{spec}} ± {std:{spec}}' if std is not None else f'{mean:{spec}}' + (' (1 seed)' if n == 1 else '')


def _results_table(results: Mapping[str, Any]) -> list[str]:
    header = ['budget', 'arm', 'lr', 'seeds', 'tokens', 'steps', 'train FLOPs', 'active / total params',
              'final train CE (last 5%)', 'held-out generic CE', 'held-out domain CE (mean ± std)', 'core average']
    dense = results.get('dense') or {}
    rows = [['0 (base)', 'dense', _f(dense.get('pretrain_lr'), 'g'), '1', _int(dense.get('pretrain_tokens')),
             _int(dense.get('pretrain_steps')), _f(dense.get('pretrain_flops'), '.3g'), _int(dense.get('params')),
             _f(dense.get('train_ce_final')), _f(_eval(dense, 'ce_generic')), _f(_eval(dense, 'ce_domain')),
             _f(_eval(dense, 'core_average'), '.3f')]]
    for b in _budgets(results):
        for arm in ARMS:
            a = _arm(results, arm, b)
            if a is None:
                rows.append([f'{b:g}', LABEL[arm], 'missing'] + [''] * 9)
                continue
            params = f'{_int(a.get("active_params"))} / {_int(a.get("total_params"))}'
            rows.append([f'{b:g}', LABEL[arm], _f(a.get('lr'), 'g'), str(a.get('n_seeds', 1)), _int(a.get('tokens')),
                         _int(a.get('steps')), _f(a.get('train_flops'), '.3g'), params, _f(a.get('train_ce_final')),
                         _pm(a, 'ce_generic'), _pm(a, 'ce_domain'), _pm(a, 'core_average', '.3f')])
    return _table(header, rows)


def _regime_lines(results: Mapping[str, Any]) -> list[str]:
    r = results.get('regime') or {}
    if not r:
        return ['The results do not record the regime.']
    tpp, chance, base = _num(r.get('base_tokens_per_param')), _num(r.get('chance_ce')), _num(r.get('base_ce_domain'))
    slope = _num(r.get('cpt_slope_per_doubling'))
    lo, hi = r.get('paper_tokens_per_param') or (100, 460)
    slo, shi = r.get('paper_cpt_slope_per_doubling') or (0.014, 0.025)
    lines = [f'**Regime: {r.get("label", "?")}.** '
             + ('This run is a test of the paper\'s claim (an over-trained, annealed dense base that knows the '
                'domain; phase-2 lrs below the pretraining peak).' if r.get('tests_paper_claim') else
                'This run does NOT test the paper\'s claim: ' + '; '.join(r.get('why_not') or []) + '.'), '',
             '| | this study | the paper |', '|---|---|---|',
             f'| dense base: pretraining tokens per parameter | {_f(tpp, ".1f")} | {lo}-{hi} |',
             f'| dense base: held-out domain CE vs chance ln V | {_f(base, ".3f")} vs {_f(chance, ".3f")} '
             f'(V = {_int(r.get("vocab_size"))}) | far below chance |',
             f'| CPT: drop in held-out domain CE per doubling of tokens | {_f(slope, ".3f")} | {slo}-{shi} |',
             f'| phase-2 lr vs pretraining peak | ' + ', '.join(f'{k} {v:g}' for k, v in
                                                             (r.get('phase2_lrs') or {}).items())
             + f' vs {_f(r.get("pretrain_lr"), "g")} | 5e-5 / 1e-4 vs a higher peak |', '']
    if slope is not None and slope > 2 * shi:
        lines.append(f'CPT still gains {slope:.3f} nats per doubling of tokens here, several times the paper\'s '
                     f'{slo}-{shi}: the arms are further from saturation than the paper\'s, so the upcycled arm\'s '
                     f'token deficit (ratio {_f(results.get("token_ratio"), ".3f")}) costs it more than it would '
                     'there. Read the verdicts with that in mind.')
    return lines


def _lr_lines(results: Mapping[str, Any]) -> list[str]:
    lr = results.get('lr') or {}
    if not lr:
        return []
    lines = [f'Phase-2 learning rates: CPT {_f(lr.get("cpt"), "g")}, upcycling {_f(lr.get("upcycle"), "g")} '
             f'(source: {lr.get("source")}; the paper picked each arm\'s lr by a sweep at its shortest budget, then '
             'kept it for all budgets).']
    sweep = lr.get('sweep')
    if sweep:
        lines += ['', f'Sweep at budget {sweep["budget"]:g} (seed 0), held-out domain CE:', '']
        lines += _table(['lr', 'CPT', 'upcycled'], [[f'{r["lr"]:g}', _f(r.get('cpt')), _f(r.get('upcycle'))]
                                                   for r in sweep['rows']])
        if sweep.get('at_edge'):
            lines += ['', f'The best lr of {", ".join(sweep["at_edge"])} is at the edge of the sweep: the optimum '
                      'may lie outside it.']
    else:
        lines.append('The default lrs come from the sweep in docs/lr_sweep.md (`--lr-sweep` reruns it).')
    return lines


def _timing_lines(results: Mapping[str, Any]) -> list[str]:
    t = results.get('timing') or {}
    fr = flop_ratio(results)
    if not t or _num(t.get('ratio')) is None:
        return ['Step times were not measured (timing off).']
    load = t.get('load_average_before'), t.get('load_average_after')
    text = (f'Measured step-time ratio, upcycled / CPT: **{t["ratio"]:.2f}** (median step '
            f'{1000 * t["step_time_s"]["upcycle"]:.0f} ms vs {1000 * t["step_time_s"]["cpt"]:.0f} ms; '
            f'{t.get("method", "")}) against a FLOP ratio of {_f(fr, ".2f")}. Load average (1/5/15 min) before '
            f'{load[0]}, after {load[1]}, on {t.get("cpu_count")} CPUs' +
            (f'; this process had {100 * t["cpu_share"]:.0f}% of a core while stepping.' if t.get('cpu_share')
             is not None else '.'))
    if t.get('loaded'):
        text += (' **The machine was loaded while this was measured** (other work took this process\'s core): '
                 'the absolute times are pessimistic and the ratio is less reliable.')
    jobs = (results.get('wall_clock') or {}).get('jobs') or 1
    where = f'trained {jobs} at a time' if jobs > 1 else 'same machine'
    return [text, '', f'Per-run throughput (tokens/s, mean over seeds; wall-clock, {where}): ' + ', '.join(
        f'{LABEL[a["arm"]]} @ {a["budget"]:g}: {_f(a.get("tokens_per_s"), ",.0f")}' for a in results['arms']) + '.']


def _router_lines(results: Mapping[str, Any], summary: Optional[Mapping[str, Any]]) -> list[str]:
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


def _verdict_lines(results: Mapping[str, Any], metric: str) -> list[str]:
    budgets = _budgets(results)
    winners = {b: ce_winner(results, b, metric) for b in budgets}
    tally = {w: sum(1 for v, _ in winners.values() if v == w) for w in ('upcycle', 'cpt', 'within noise', 'n/a')}
    lines = [f'- budget {b:g}: {text}' for b, (_, text) in winners.items()]
    lines += ['', f'Upcycled ahead at {tally["upcycle"]}, CPT ahead at {tally["cpt"]}, within noise at '
              f'{tally["within noise"]} of {len(budgets)} budgets' +
              (f' ({tally["n/a"]} without a verdict)' if tally['n/a'] else '') +
              ' (ahead = the gap exceeds 2 standard errors).']
    return lines


def _task_table(results: Mapping[str, Any]) -> list[str]:
    columns = [('dense base', results.get('dense'))] + [
        (f'{"CPT" if a["arm"] == "cpt" else "upcycled"} {a["budget"]:g}', a)
        for a in sorted(results['arms'], key=lambda a: (a['budget'], a['arm']))]
    tasks = sorted({t for _, e in columns for t in (((e or {}).get('eval') or {}).get('tasks') or {})})
    if not tasks:
        return ['No per-task scores were recorded.']
    rows = [[t] + [_f((((e or {}).get('eval') or {}).get('tasks') or {}).get(t), '.3f') for _, e in columns]
            for t in tasks]
    return _table(['task'] + [c for c, _ in columns], rows)


def render_markdown(results: Mapping[str, Any], figures: Mapping[str, str],
                    extra_sections: Sequence[str] = (), router: Optional[Mapping[str, Any]] = None) -> str:
    budgets = _budgets(results)
    dense = results.get('dense') or {}
    ratio = _num(results.get('token_ratio'))
    missing = results.get('missing_eval_tasks') or []
    rw = results.get('router_weights') or 'renormalized'
    top = next((a for a in results['arms'] if a['budget'] == max(budgets)), {})
    lines = [
        '# Continued pretraining vs sparse upcycling',
        '',
        f'A dense base model ({_int(dense.get("params"))} parameters, pretrained on '
        f'{_int(dense.get("pretrain_tokens"))} tokens) was trained further on the domain mix in two ways at '
        f'matched training FLOPs: continued pretraining of the dense model (CPT), and upcycling it into a '
        f'mixture of experts. Budgets are fractions of the dense pretraining FLOPs: '
        f'{", ".join(f"{b:g}" for b in budgets)}; {top.get("n_seeds", 1)} seed(s) at the largest.'
        + (f' Router weights: **{rw}** (ablation: softmax over all experts, top-k without renormalisation, '
           'He et al. 2024).' if rw != 'renormalized' else ''),
        '',
        f'**Upcycled / CPT token ratio at matched FLOPs: {_f(ratio, ".3f")}** (the MoE spends more FLOPs per '
        'token on its active experts, so it sees fewer tokens; the paper reports about 0.75 for its 436M model '
        'and 0.68 for 1.4B).',
        '',
        '## Regime',
        '',
        *_regime_lines(results),
        '',
        '## Held-out domain cross-entropy: which arm is ahead',
        '',
        *_verdict_lines(results, 'ce_domain'),
        '',
        '## Core average (eval gauntlet v0.3, chance-normalised): which arm is ahead',
        '',
        *_verdict_lines(results, 'core_average'),
        '',
        '## Learning rates',
        '',
        *_lr_lines(results),
        '',
        '## Results',
        '',
    ]
    lines += _results_table(results)
    lines += ['', 'CE: cross-entropy in nats/token, lower is better; ± is the standard deviation over seeds. Core '
              'average: eval gauntlet v0.3, chance-normalised (0 = random guessing). Final train CE: '
              f'{results.get("train_ce_definition", "mean over the last steps")}.', '', '## Figures', '',
              f'![Figure 1]({figures["figure1"]})', '',
              'Figure 1 (as in the paper): left, relative core-average gain of upcycling over CPT; right, held-out '
              'domain CE (mean over seeds, bars: 2 standard errors) and final training CE of both arms.', '',
              f'![Figure 4]({figures["figure4"]})', '',
              'Figure 4 (as in the paper): core average of both arms, with the dense base as a horizontal line.', '',
              f'![Training loss]({figures["loss"]})', '',
              'Training loss of both arms at each budget (seed 0), against tokens seen.', '',
              '## Router health', '', *_router_lines(results, router), '',
              '## Step time', '', f'![Step times]({figures["throughput"]})', '', *_timing_lines(results)]
    lines += ['', '## Evaluation coverage', '']
    if missing:
        lines.append(f'Tasks not evaluated (no data, or not selected): {", ".join(sorted(missing))}. Foundry drops '
                     'a category with any missing task; our core average is over the tasks present.')
    else:
        lines.append('No eval tasks were missing.')
    lines += ['', '### Per-task scores (mean over seeds)', '']
    lines += _task_table(results)
    lines += ['', '## Caveats', '']
    params = _num(dense.get('params'))
    if params is None or params < TINY_PARAMS:
        lines.append(f'This is a tiny model ({_int(params)} parameters). Its eval gauntlet scores sit near chance '
                     'level, so the core average mostly measures noise (its error bars say how much); held-out '
                     'cross-entropy is the meaningful measurement at this scale. The paper\'s findings were made at '
                     '436M and 1.4B parameters on tens to hundreds of billions of tokens.')
        lines.append('')
    lines.append('A verdict needs the gap to exceed 2 standard errors: over seeds where a budget has several; at a '
                 'one-seed budget, the seed spread pooled from the budgets with several (labelled in '
                 'results.json `comparisons`). The lr was selected on the same held-out domain set that is reported.')
    lines.append('')
    for section in extra_sections:
        lines += [section.rstrip('\n'), '']
    lines += ['## Study config', '', '```json', json.dumps(results.get('config') or {}, indent=2, sort_keys=True),
              '```', '']
    return '\n'.join(lines)


def write_report(results: dict, out_dir, extra_sections: Sequence[str] = ()) -> Path:
    """Writes report.md and the PNG plots into out_dir (each file atomically); returns the report path."""
    check_results(results)
    if isinstance(extra_sections, str):
        raise ValueError('extra_sections must be a list of markdown strings, not a single string')
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f'report output {out} is not writable ({e})') from None
    plot_figure1(results, out / FIGURES['figure1'])
    plot_figure4(results, out / FIGURES['figure4'])
    plot_loss_curves(results, out / FIGURES['loss'])
    plot_throughput(results, out / FIGURES['throughput'])
    router = router_summary(results)
    if router is not None:
        plot_router(router, out / ROUTER_FIGURE)
    text = render_markdown(results, FIGURES, extra_sections, router)
    report = out / 'report.md'
    atomic_write(str(report), lambda tmp: Path(tmp).write_text(text, encoding='utf-8'))
    return report
