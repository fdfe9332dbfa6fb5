"""The study report: `report.md` and PNG plots from a results.json (schema 1, see README).

Plots (Matplotlib, object API, no pyplot state):
- figure1_upcycle_vs_cpt.png: the paper's Figure 1, relative core-average gain of upcycling over CPT and final
  cross-entropy of both arms against the training budget;
- figure4_core_average.png: the paper's Figure 4, absolute core average of both arms and the dense baseline;
- loss_curves.png: training loss of both arms, one panel per budget;
- throughput.png: measured tokens/s per arm, and measured step-time ratio against the FLOP ratio.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from foundry_upcycle.atomic import atomic_write

SCHEMA = 1
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


# ------------------------------------------------------------------------------------------------ reading


def _num(x: Any) -> Optional[float]:
    """A finite float, or None for missing / non-numeric / NaN values."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return float(x)


def _eval(entry: Optional[Mapping[str, Any]], key: str) -> Optional[float]:
    return _num(((entry or {}).get('eval') or {}).get(key))


def check_results(results: Any) -> None:
    """ValueError naming what is wrong when `results` does not follow schema 1."""
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


def ce_winner(results: Mapping[str, Any], budget: float) -> tuple[str, str]:
    """('cpt' | 'upcycle' | 'tie' | 'n/a', a sentence) for held-out domain CE at one budget; lower wins."""
    cpt, up = (_eval(_arm(results, a, budget), 'ce_domain') for a in ARMS)
    if cpt is None or up is None:
        return 'n/a', 'not measured (an arm or its domain CE is missing)'
    if round(cpt, 4) == round(up, 4):
        return 'tie', f'tie: both {cpt:.4f}'
    winner = 'upcycle' if up < cpt else 'cpt'
    return winner, (f'**{LABEL[winner]}** wins: {up:.4f} (upcycled) vs {cpt:.4f} (CPT), '
                    f'difference {abs(up - cpt):.4f} nats/token')


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
        curves = ((lambda a: _eval(a, 'ce_domain'), 'o-', 'held-out domain CE'),
                  (lambda a: _num((a or {}).get('train_ce_last50')), 's--', 'train CE, last 50 steps'))
        for value, style, what in curves:
            bx, by = _series(results, arm, value)
            if bx:
                ax.plot(bx, by, style, color=COLOR[arm], label=f'{LABEL[arm]}: {what}')
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
        if bx:
            ax.plot(bx, by, 'o-', color=COLOR[arm], lw=2, label=LABEL[arm])
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


def step_time_ratios(results: Mapping[str, Any]) -> dict[float, float]:
    out = {}
    for b in _budgets(results):
        cpt, up = (_num((_arm(results, a, b) or {}).get('step_time_s')) for a in ARMS)
        if cpt and up:
            out[b] = up / cpt
    return out


def plot_throughput(results: Mapping[str, Any], path: Path) -> None:
    fig, axes = _new_figure(2)
    ax = axes[0][0]
    budgets = _budgets(results)
    width = 0.38
    for k, arm in enumerate(ARMS):
        vals = [_num((_arm(results, arm, b) or {}).get('tokens_per_s')) for b in budgets]
        xs = [i + (k - 0.5) * width for i in range(len(budgets))]
        ax.bar([x for x, v in zip(xs, vals) if v is not None], [v for v in vals if v is not None], width,
               color=COLOR[arm], label=LABEL[arm])
    ax.set_xticks(range(len(budgets)))
    ax.set_xticklabels([f'{b:g}' for b in budgets])
    ax.set_xlabel(BUDGET_AXIS)
    ax.set_ylabel('measured training throughput (tokens/s)')
    ax.set_title('Training throughput per arm')
    ax.grid(True, axis='y', alpha=0.3)
    _legend_below(ax)
    ax = axes[0][1]
    ratios = step_time_ratios(results)
    if ratios:
        ax.plot(list(ratios), list(ratios.values()), 'o-', color=COLOR['upcycle'], lw=2,
                label='measured: upcycled / CPT step time')
    fr = flop_ratio(results)
    if fr is not None:
        ax.axhline(fr, color='black', ls='--', label=f'FLOP ratio (upcycled / dense per token) = {fr:.2f}')
    ax.axhline(1, color='gray', ls=':', lw=0.8)
    ax.set_ylabel('upcycled / CPT time per step (x)')
    ax.set_title('Step-time ratio vs FLOP ratio\n(same batch and sequence length in both arms)')
    _budget_axis(ax, results)
    _legend_below(ax)
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


def _results_table(results: Mapping[str, Any]) -> list[str]:
    header = ['budget', 'arm', 'tokens', 'steps', 'train FLOPs', 'active / total params', 'train CE (last 50)',
              'held-out generic CE', 'held-out domain CE', 'core average', 'tokens/s', 's/step']
    dense = results.get('dense') or {}
    rows = [['0 (base)', 'dense', _int(dense.get('pretrain_tokens')), '', _f(dense.get('pretrain_flops'), '.3g'),
             _int(dense.get('params')), '', _f(_eval(dense, 'ce_generic')), _f(_eval(dense, 'ce_domain')),
             _f(_eval(dense, 'core_average')), '', '']]
    for b in _budgets(results):
        for arm in ARMS:
            a = _arm(results, arm, b)
            if a is None:
                rows.append([f'{b:g}', LABEL[arm], 'missing'] + [''] * 9)
                continue
            params = f'{_int(a.get("active_params"))} / {_int(a.get("total_params"))}'
            rows.append([f'{b:g}', LABEL[arm], _int(a.get('tokens')), _int(a.get('steps')),
                         _f(a.get('train_flops'), '.3g'), params, _f(a.get('train_ce_last50')),
                         _f(_eval(a, 'ce_generic')), _f(_eval(a, 'ce_domain')), _f(_eval(a, 'core_average')),
                         _f(a.get('tokens_per_s'), ',.0f'), _f(a.get('step_time_s'), '.3f')])
    return _table(header, rows)


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
                    extra_sections: Sequence[str] = ()) -> str:
    budgets = _budgets(results)
    dense = results.get('dense') or {}
    ratio = _num(results.get('token_ratio'))
    missing = results.get('missing_eval_tasks') or []
    winners = {b: ce_winner(results, b) for b in budgets}
    tally = {w: sum(1 for v, _ in winners.values() if v == w) for w in ('upcycle', 'cpt', 'tie', 'n/a')}
    lines = [
        '# Continued pretraining vs sparse upcycling',
        '',
        f'A dense base model ({_int(dense.get("params"))} parameters, pretrained on '
        f'{_int(dense.get("pretrain_tokens"))} tokens) was trained further on the domain mix in two ways at '
        f'matched training FLOPs: continued pretraining of the dense model (CPT), and upcycling it into a '
        f'mixture of experts. Budgets are fractions of the dense pretraining FLOPs: '
        f'{", ".join(f"{b:g}" for b in budgets)}.',
        '',
        f'**Upcycled / CPT token ratio at matched FLOPs: {_f(ratio, ".3f")}** (the MoE spends more FLOPs per '
        'token on its active experts, so it sees fewer tokens; the paper reports about 0.75 for its 436M model '
        'and 0.68 for 1.4B).',
        '',
        '## Which arm won on held-out domain cross-entropy',
        '',
    ]
    lines += [f'- budget {b:g}: {text}' for b, (_, text) in winners.items()]
    lines += ['', f'Upcycled won at {tally["upcycle"]}, CPT at {tally["cpt"]} of {len(budgets)} budgets'
              + (f' ({tally["tie"]} tied)' if tally['tie'] else '')
              + (f' ({tally["n/a"]} not measured)' if tally['n/a'] else '') + '. These are the measured values.',
              '', '## Results', '']
    lines += _results_table(results)
    lines += ['', 'CE: cross-entropy in nats/token, lower is better. Core average: eval gauntlet v0.3, '
              'chance-normalised (0 = random guessing).', '', '## Figures', '',
              f'![Figure 1]({figures["figure1"]})', '',
              'Figure 1 (as in the paper): left, relative core-average gain of upcycling over CPT; right, final '
              'held-out domain CE and training CE (mean of the last 50 steps) of both arms.', '',
              f'![Figure 4]({figures["figure4"]})', '',
              'Figure 4 (as in the paper): core average of both arms, with the dense base as a horizontal line.', '',
              f'![Training loss]({figures["loss"]})', '',
              'Training loss of both arms at each budget, against tokens seen.', '',
              f'![Throughput]({figures["throughput"]})', '']
    fr, ratios = flop_ratio(results), step_time_ratios(results)
    if ratios:
        mean = sum(ratios.values()) / len(ratios)
        lines.append(f'Measured step time, upcycled / CPT: {", ".join(f"{r:.2f}" for r in ratios.values())} '
                     f'(mean {mean:.2f}) against a FLOP ratio of {_f(fr, ".2f")} (same batch in both arms). '
                     'Routing, expert dispatch and memory traffic, not FLOPs alone, set the measured step time, '
                     'so the two ratios need not agree.')
    else:
        lines.append('Step times were not recorded for both arms, so no measured step-time ratio is shown.')
    lines += ['', '## Evaluation coverage', '']
    if missing:
        lines.append(f'Missing eval tasks (no data found, left out of the gauntlet; a category with any missing '
                     f'task is dropped from the core average): {", ".join(sorted(missing))}.')
    else:
        lines.append('No eval tasks were missing.')
    lines += ['', '### Per-task scores', '']
    lines += _task_table(results)
    lines += ['', '## Caveats', '']
    params = _num(dense.get('params'))
    if params is None or params < TINY_PARAMS:
        lines.append(f'This is a tiny model ({_int(params)} parameters) trained briefly. Its eval gauntlet '
                     'scores sit near chance level, so differences in core average between the arms are mostly '
                     'noise and say nothing about the paper\'s claim; held-out cross-entropy is the meaningful '
                     'measurement at this scale. The paper\'s findings were made at 436M and 1.4B parameters on '
                     'tens to hundreds of billions of tokens.')
        lines.append('')
    lines.append(f'Each number comes from a single training run (one seed), without error bars. Relative '
                 f'core-average gains are not computed where CPT scores at chance (core average <= '
                 f'{MIN_BASE_FOR_RELATIVE}).')
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
    text = render_markdown(results, FIGURES, extra_sections)
    report = out / 'report.md'
    atomic_write(str(report), lambda tmp: Path(tmp).write_text(text, encoding='utf-8'))
    return report
