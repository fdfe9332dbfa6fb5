"""The study report's figures (Matplotlib, object API, no pyplot state), from a results.json:
- figure1_upcycle_vs_cpt.png: the paper's Figure 1, relative core-average gain of upcycling over CPT and final
  cross-entropy of every arm (mean over seeds, error bars: 2 standard errors) against the training budget;
- figure4_core_average.png: the paper's Figure 4, absolute core average of every arm and the dense baseline;
- loss_curves.png: training loss of every arm (seed 0), one panel per budget;
- throughput.png: interleaved, warmed-up step times of the arms and their ratio against the FLOP ratio;
- router.png (when the runs logged `router/...` through the `upcycle_router_monitor` callback): per-layer expert
  load heatmap at the end of the largest budget's upcycled run, and router entropy / expert spread / LBL curves.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from foundry_upcycle.atomic import atomic_write
from foundry_upcycle.study import arms as arm_registry
from foundry_upcycle.study.arms import color as arm_color
from foundry_upcycle.study.arms import label as arm_label
from foundry_upcycle.study.results_view import (DENSE_COLOR, DENSE_LABEL, above_chance, arm_names, budgets_of,
                                                ci_half, eval_value,
                                                find_arm, flop_ratio, num)

BUDGET_AXIS = 'training budget (fraction of the dense pretraining FLOPs)'
# Below this chance-normalised score a relative change divides by noise.
MIN_BASE_FOR_RELATIVE = 0.01
FIGURES = {
    'figure1': 'figure1_upcycle_vs_cpt.png',
    'figure4': 'figure4_core_average.png',
    'loss': 'loss_curves.png',
    'throughput': 'throughput.png',
}
ROUTER_FIGURE = 'router.png'


def relative_gain(upcycle: Optional[float], cpt: Optional[float]) -> Optional[float]:
    """(upcycle - cpt) / cpt in percent; None when either is missing or CPT is at chance (<= 0.01)."""
    if upcycle is None or cpt is None or cpt <= MIN_BASE_FOR_RELATIVE:
        return None
    return 100.0 * (upcycle - cpt) / cpt



def _series(results, arm: str, key_fn) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for b in budgets_of(results):
        y = key_fn(find_arm(results, arm, b))
        if y is not None:
            xs.append(b)
            ys.append(y)
    return xs, ys


def _budget_axis(ax, results) -> None:
    budgets = budgets_of(results)
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


def _core_panel(ax, results: Mapping[str, Any]) -> None:
    """Relative core-average gain, only at budgets where CPT's core average is significantly above chance (a ratio
    of two near-zero numbers is noise); with none, the absolute core averages with their 95% intervals."""
    up, base = arm_registry.PRIMARY, arm_registry.BASELINE
    ok = [b for b in budgets_of(results) if above_chance(find_arm(results, base, b))]
    ax.axhline(0, color='black', lw=0.8)
    if ok:
        gains = [relative_gain(eval_value(find_arm(results, up, b), 'core_average'),
                               eval_value(find_arm(results, base, b), 'core_average')) for b in ok]
        ax.plot(ok, gains, 'o-', color=arm_color(up), lw=2, label='upcycled vs CPT')
        for b in budgets_of(results):
            if b not in ok:
                ax.annotate('n/a', (b, 0), textcoords='offset points', xytext=(0, 8), ha='center', color='gray')
        ax.set_ylabel('relative core-average gain of upcycled over CPT (%)')
        ax.set_title('Core average: upcycled vs CPT\n(n/a: CPT not significantly above chance there)')
        ax.legend(loc='best')
    else:
        for arm in arm_names(results):
            bx, by = _series(results, arm, lambda a: eval_value(a, 'core_average'))
            errs = [ci_half(find_arm(results, arm, b), 'core_average') or 0.0 for b in bx]
            if bx:
                ax.errorbar(bx, by, yerr=errs, fmt='o-', color=arm_color(arm), capsize=3, label=arm_label(arm))
        ax.set_ylabel('core average (chance-normalised; 0 = chance)')
        ax.set_title('Core average (bars: 95% CI). CPT is not significantly above\nchance at any budget: '
                     'no relative gain is shown (it would divide noise)', fontsize=9)
        if ax.lines:
            ax.legend(loc='best', fontsize=8)
    _budget_axis(ax, results)


def plot_figure1(results: Mapping[str, Any], path: Path) -> None:
    fig, axes = _new_figure(2)
    _core_panel(axes[0][0], results)
    ax = axes[0][1]
    for arm in arm_names(results):
        bx, by = _series(results, arm, lambda a: eval_value(a, 'ce_domain'))
        errs = [ci_half(find_arm(results, arm, b), 'ce_domain') or 0.0 for b in bx]
        if bx:
            ax.errorbar(bx, by, yerr=errs, fmt='o-', color=arm_color(arm), capsize=3,
                        label=f'{arm_label(arm)}: held-out (test) domain CE (bars: 95% CI over seeds)')
        bx, by = _series(results, arm, lambda a: num((a or {}).get('train_ce_final')))
        if bx:
            ax.plot(bx, by, 's--', color=arm_color(arm), alpha=0.6,
                    label=f'{arm_label(arm)}: final train CE (last 5%)')
    dense_ce = eval_value(results.get('dense'), 'ce_domain')
    if dense_ce is not None:
        ax.axhline(dense_ce, color=DENSE_COLOR, ls=':', label=f'{DENSE_LABEL}: held-out domain CE')
    ax.set_ylabel('cross-entropy (nats/token, lower is better)')
    ax.set_title('Final cross-entropy of both arms')
    _budget_axis(ax, results)
    _legend_below(ax)
    fig.suptitle('Figure 1: upcycling vs continued pretraining at matched training FLOPs')
    _save(fig, path)


def plot_figure4(results: Mapping[str, Any], path: Path) -> None:
    fig, axes = _new_figure(1, width=7.0)
    ax = axes[0][0]
    for arm in arm_names(results):
        bx, by = _series(results, arm, lambda a: eval_value(a, 'core_average'))
        errs = [ci_half(find_arm(results, arm, b), 'core_average') or 0.0 for b in bx]
        if bx:
            ax.errorbar(bx, by, yerr=errs, fmt='o-', color=arm_color(arm), lw=2, capsize=3,
                        label=f'{arm_label(arm)} (bars: 95% CI, seeds + ICL examples)')
    dense = eval_value(results.get('dense'), 'core_average')
    if dense is not None:
        ax.axhline(dense, color=DENSE_COLOR, ls='--', label=DENSE_LABEL)
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
    budgets = budgets_of(results)
    ncols = min(3, len(budgets))
    nrows = math.ceil(len(budgets) / ncols)
    fig, axes = _new_figure(ncols, nrows, width=5.2, height=3.8)
    for i, b in enumerate(budgets):
        ax = axes[i // ncols][i % ncols]
        for arm in arm_names(results):
            a = find_arm(results, arm, b) or {}
            curve = [(s, l) for s, l in (a.get('loss_curve') or []) if num(l) is not None]
            steps, tokens = num(a.get('steps')), num(a.get('tokens'))
            per_step = tokens / steps if steps and tokens else None
            if not curve:
                continue
            xs = [s * per_step if per_step else s for s, _ in curve]
            ys = [float(l) for _, l in curve]
            ax.plot(xs, ys, color=arm_color(arm), alpha=0.25, lw=0.8)
            ax.plot(xs, _smooth(ys, max(1, len(ys) // 20)), color=arm_color(arm), lw=2, label=f'{arm_label(arm)}')
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



def plot_throughput(results: Mapping[str, Any], path: Path) -> None:
    fig, axes = _new_figure(2)
    timing = results.get('timing') or {}
    steps = timing.get('steps_s') or {}
    ax = axes[0][0]
    for k, arm in enumerate(arm_names(results)):
        ts = [1000 * t for t in steps.get(arm, [])]
        if ts:
            ax.plot(range(1, len(ts) + 1), ts, 'o-', color=arm_color(arm), label=f'{arm_label(arm)}: median '
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
    if num(timing.get('ratio')) is not None:
        labels.append('measured\n(median steps)')
        values.append(timing['ratio'])
        colors.append(arm_color(arm_registry.PRIMARY))
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


def router_summary(results: Mapping[str, Any], arm: str = arm_registry.PRIMARY) -> Optional[dict[str, Any]]:
    """The largest budget's run of an upcycled arm (seed 0): final load per layer and expert, and the curves; None
    if the runs did not log `router/...` (the `upcycle_router_monitor` callback was not in the recipe)."""
    top = max(budgets_of(results))
    series = _router_series(find_arm(results, arm, top))
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
            'lbl_total': total_lbl, 'arm': arm}


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
    arm = summary.get('arm', arm_registry.PRIMARY)
    what = 'upcycled run' if arm == arm_registry.PRIMARY else arm_registry.label(arm)
    fig.suptitle(f'Router health, {what} at budget {summary["budget"]:g} (seed 0)')
    _save(fig, path)

