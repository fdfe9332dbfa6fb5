"""Several dense bases, pretrained for different lengths (tokens per parameter, like the paper's Medium / Long /
Extra Long): one full study per base in `<out>/tpp<N>/`, then `<out>/report.md` and `regimes.json` showing how
upcycling's gain over CPT (held-out domain CE, at each budget) changes with the base's training length."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

from foundry_upcycle.atomic import atomic_write
from foundry_upcycle.study.arms import PRIMARY
from foundry_upcycle.study.config import StudyConfig

FIGURE = 'gain_vs_pretraining.png'


def sub_config(cfg: StudyConfig, tpp: float) -> StudyConfig:
    return cfg.replace(out=str(Path(cfg.out) / f'tpp{tpp:g}'), pretrain_tokens_per_param=(tpp,))


def summarize(per_base: Mapping[float, Mapping[str, Any]]) -> dict[str, Any]:
    """{'bases': [{tokens_per_param, base_ce_domain, label, budgets: {b: comparison}}]} from each study's results."""
    bases = []
    for tpp, res in sorted(per_base.items()):
        bases.append({'tokens_per_param_asked': tpp,
                      'tokens_per_param': res['regime']['base_tokens_per_param'],
                      'base_ce_domain': res['regime']['base_ce_domain'], 'regime': res['regime']['label'],
                      'tests_paper_claim': res['regime']['tests_paper_claim'],
                      'budgets': {b: c['ce_domain'] for b, c in res['comparisons'][PRIMARY].items()}})
    return {'schema': 1, 'metric': 'ce_domain (upcycled - CPT; negative = upcycling ahead)', 'bases': bases}


def render(summary: Mapping[str, Any]) -> str:
    budgets = sorted({b for base in summary['bases'] for b in base['budgets']}, key=float)
    lines = ['# Upcycling vs CPT against the dense base\'s pretraining length', '',
             'One full study per base (`tpp<N>/report.md`). Each cell: held-out domain CE of the upcycled arm minus '
             'CPT\'s (negative = upcycling ahead) ± its standard error, and the verdict (2-SE rule).', '',
             f'![gain vs pretraining length]({FIGURE})', '',
             '| base tokens/param | base domain CE | regime | ' + ' | '.join(f'budget {b}' for b in budgets) + ' |',
             '|---|---|---|' + '---|' * len(budgets)]
    for base in summary['bases']:
        cells = []
        for b in budgets:
            c = base['budgets'].get(b) or {}
            gap, se = c.get('gap'), c.get('se')
            cells.append('n/a' if gap is None else f'{gap:+.4f}' + (f' ± {se:.4f}' if se else '') +
                         f' ({c.get("winner")})')
        lines.append(f'| {base["tokens_per_param"]:.1f} | {base["base_ce_domain"]:.3f} | {base["regime"]} | '
                     + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


def plot(summary: Mapping[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7, 4.4), layout='constrained')
    ax = fig.subplots()
    budgets = sorted({b for base in summary['bases'] for b in base['budgets']}, key=float)
    for b in budgets:
        pts = [(base['tokens_per_param'], base['budgets'][b]) for base in summary['bases'] if b in base['budgets']]
        pts = [(x, c) for x, c in pts if c.get('gap') is not None]
        if pts:
            ax.errorbar([x for x, _ in pts], [c['gap'] for _, c in pts],
                        yerr=[2 * (c.get('se') or 0.0) for _, c in pts], fmt='o-', capsize=3, label=f'budget {b}')
    ax.axhline(0, color='black', lw=0.8)
    ax.set_xscale('log')
    ax.set_xlabel('dense base: pretraining tokens per parameter')
    ax.set_ylabel('upcycled - CPT held-out domain CE (nats; < 0: upcycling ahead)')
    ax.set_title('Upcycling\'s gain against the base\'s training length (bars: 2 SE)')
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend()
    atomic_write(str(path), lambda tmp: fig.savefig(tmp, format='png', dpi=110))


def run_regimes(cfg: StudyConfig, run_one: Callable[[StudyConfig], Mapping[str, Any]]) -> dict[str, Any]:
    """`run_one(sub_config)` for each base length (the pipeline passes its Study), then the comparison."""
    from foundry_upcycle.study.results import write_json
    per_base = {tpp: run_one(sub_config(cfg, tpp)) for tpp in cfg.regimes}
    summary = summarize(per_base)
    out = Path(cfg.out)
    write_json(out / 'regimes.json', summary)
    plot(summary, out / FIGURE)
    text = render(summary)
    atomic_write(str(out / 'report.md'), lambda tmp: Path(tmp).write_text(text, encoding='utf-8'))
    return summary

