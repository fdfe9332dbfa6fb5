"""Figures for the inference benchmark and the cost report (Matplotlib, Agg backend, written to PNG)."""
from __future__ import annotations

from typing import Any

MARKERS = ('o', 's', '^', 'D', 'v', 'P')


def _pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def _curve(ax, runs: list[dict[str, Any]], label_of, name: str, marker: str) -> None:
    """Points joined in the order of the setting (batch size or request rate), as in the paper's figures."""
    xs = [r['total_tokens_per_s'] for r in runs]
    ys = [r['latency_p50_s'] for r in runs]
    ax.plot(xs, ys, marker=marker, label=name)
    for r, x, y in zip(runs, xs, ys):
        ax.annotate(label_of(r), (x, y), textcoords='offset points', xytext=(4, 4), fontsize=7)


def plot_latency_vs_throughput(result: dict[str, Any], path: str) -> None:
    """One curve per model: x output throughput, y median end-to-end latency; offline and online side by side."""
    plt = _pyplot()
    models = result['models']
    panels = [('offline', 'Offline: static batches (point label = batch size)', lambda r: f"b={r['batch_size']}")]
    if any(m['online'] for m in models):
        mode = str(models[0].get('online_mode', '')).split(' (')[0]
        panels.append(('online', f'Online: Poisson arrivals, {mode} (point label = request rate)',
                       lambda r: f"{r['rate']:g}/s"))
    panels = [p for p in panels if any(m[p[0]] for m in models)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    for ax, (mode, title, label_of) in zip(axes[0], panels):
        for i, m in enumerate(models):
            runs = sorted((r for r in m[mode] if r['num_served'] and r['latency_p50_s'] is not None),
                          key=lambda r: r.get('batch_size') or r.get('rate'))
            if runs:
                _curve(ax, runs, label_of, f"{m['name']} ({_params(m)})", MARKERS[i % len(MARKERS)])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel('throughput (input + output tokens/s)')
        ax.set_ylabel('median end-to-end latency per request (s)')
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    env, wl = result['environment'], result['workload']
    fig.suptitle(f"Latency vs throughput, dense vs upcycled MoE — {wl['input_tokens']} in / {wl['output_tokens']} "
                 f"out tokens, engine {env['engine']}, {env['device']} ({env['dtype']})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format='png')
    plt.close(fig)


def _params(m: dict[str, Any]) -> str:
    def fmt(n: int) -> str:
        return f'{n / 1e9:.2f}B' if n >= 1e9 else f'{n / 1e6:.2f}M'
    if m['total_params'] == m['active_params']:
        return f"{fmt(m['total_params'])} params"
    return f"{fmt(m['total_params'])} total, {fmt(m['active_params'])} active"


def plot_breakeven(cost: dict[str, Any], path: str) -> None:
    """Left: CPT domain CE vs training compute with the upcycled points and the compute CPT needs to match them.
    Right: lifetime tokens served beyond which the dense CPT model is cheaper, per budget (log scale)."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    _quality_panel(left, cost)
    _breakeven_panel(right, cost)
    fig.suptitle('Upcycling vs continued pretraining: when does the cheaper-to-serve dense model win?', fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format='png')
    plt.close(fig)


def _quality_panel(ax, cost: dict[str, Any]) -> None:
    metric = cost['primary_metric']
    curve = cost['cpt_curves'][metric]
    ax.plot(curve['train_flops'], curve['values'], 'o-', label='CPT (measured)')
    ax.plot([b['upcycle']['train_flops'] for b in cost['budgets']],
            [b['upcycle'][metric] for b in cost['budgets']], 's', label='upcycled MoE (measured)')
    for b in cost['budgets']:
        match = b['break_even'][metric]
        if match and match['cpt_train_flops_needed'] is not None:
            style = ':' if match['status'] == 'extrapolated' else '--'
            ax.plot([b['cpt']['train_flops'], match['cpt_train_flops_needed']], [b['upcycle'][metric]] * 2,
                    style, color='gray')
            ax.plot([match['cpt_train_flops_needed']], [b['upcycle'][metric]], 'x', color='gray')
    ax.plot([], [], '--x', color='gray', label='CPT compute needed to match (dotted: extrapolated)')
    ax.set_xscale('log')
    ax.set_xlabel('training compute of the CPT / upcycling phase (FLOPs, log scale)')
    ax.set_ylabel(f"{metric} ({'nats, lower is better' if metric.startswith('ce') else 'higher is better'})")
    ax.set_title('Quality vs training compute', fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def _breakeven_panel(ax, cost: dict[str, Any]) -> None:
    metric = cost['primary_metric']
    budgets = cost['budgets']
    width = 0.38
    finite: list[float] = []
    labels: list[tuple[float, str]] = []
    for j, basis in enumerate(('seconds', 'flops')):
        for i, b in enumerate(budgets):
            be = b['break_even'][metric]
            tokens = be[f'tokens_{basis}'] if be else None
            x = i + (j - 0.5) * width
            if tokens is not None and tokens > 0:
                ax.bar(x, tokens, width, color=f'C{j}')
                finite.append(tokens)
            elif be is None:
                labels.append((x, 'n/a'))
            else:
                labels.append((x, 'CPT already as good' if tokens == 0 else be[f'verdict_{basis}'].split(' (')[0]))
    ax.set_yscale('log')
    low, high = (min(finite) / 10, max(finite) * 10) if finite else (1.0, 1e3)
    ax.set_ylim(low, high)
    for x, text in labels:  # no bar: 'never', '0' (CPT already as good) or n/a
        ax.text(x, low * 1.5, text, rotation=90, ha='center', va='bottom', fontsize=8)
    ax.set_xticks(range(len(budgets)), [f"{b['budget']:g}x" for b in budgets])
    ax.set_xlim(-0.6, len(budgets) - 0.4)
    ax.set_xlabel('training budget (fraction of the dense pretraining FLOPs)')
    ax.set_ylabel('break-even lifetime demand (tokens processed, log)')
    ax.set_title(f'Above the bar the dense CPT model is cheaper for the same {metric}', fontsize=10)
    ax.grid(True, axis='y', alpha=0.3)
    from matplotlib.patches import Patch
    ax.legend(handles=[Patch(color='C0', label='measured seconds (training and serving)'),
                       Patch(color='C1', label='extra cost per token from FLOPs')], fontsize=8)
