"""Several dense bases, pretrained for different lengths (tokens per parameter, like the paper's Medium / Long /
Extra Long): one full study per base in `<out>/tpp<N>/` (each with its own lr sweep on validation), then
`<out>/report.md` and `regimes.json` showing how upcycling's gain over CPT (test-split domain CE, by the study's
paired test) changes with the base's training length: at equal fractions of each base's pretraining FLOPs, and at
equal phase-2 tokens (a budget b on a base of N tokens/param trains as long as b * N / M on one of M)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

from foundry_upcycle.atomic import atomic_write
from foundry_upcycle.study.arms import BASELINE, PRIMARY
from foundry_upcycle.study.config import StudyConfig

FIGURE = 'gain_vs_pretraining.png'


def sub_config(cfg: StudyConfig, tpp: float) -> StudyConfig:
    return cfg.replace(out=str(Path(cfg.out) / f'tpp{tpp:g}'), pretrain_tokens_per_param=(tpp,))


def summarize(per_base: Mapping[float, Mapping[str, Any]]) -> dict[str, Any]:
    """{'bases': [{tokens_per_param, base_ce_domain, label, budgets: {b: comparison}}]} from each study's results."""
    bases = []
    for tpp, res in sorted(per_base.items()):
        cpt_tokens = {f'{a["budget"]:g}': a['tokens'] for a in res['arms'] if a['arm'] == BASELINE}
        bases.append({'tokens_per_param_asked': tpp,
                      'tokens_per_param': res['regime']['base_tokens_per_param'],
                      'params': res['dense']['params'],
                      'base_ce_domain': res['regime']['base_ce_domain'], 'regime': res['regime']['label'],
                      'tests_paper_claim': res['regime']['tests_paper_claim'],
                      'lrs': {k: v for k, v in (res.get('lr') or {}).items() if k in (BASELINE, PRIMARY)},
                      'budgets': {b: {**c['ce_domain'], 'cpt_tokens': cpt_tokens.get(b)}
                                  for b, c in res['comparisons'][PRIMARY].items()}})
    return {'schema': 2, 'metric': 'ce_domain (upcycled - CPT; negative = upcycling ahead)', 'bases': bases}


def _cell(c: Mapping[str, Any]) -> str:
    if not c or c.get('gap') is None:
        return 'n/a'
    ci = c.get('ci')
    return f'{c["gap"]:+.4f}' + (f' [{ci[0]:+.4f}, {ci[1]:+.4f}]' if ci else '') + f' ({c.get("winner")})'


def equal_tokens(summary: Mapping[str, Any]) -> list[tuple[float, dict[float, Mapping[str, Any]]]]:
    """[(phase-2 CPT tokens per base parameter, {base tokens/param: comparison})] where two or more bases trained
    the same number of phase-2 tokens (within 5%): the comparison that length alone cannot confound."""
    cells = [(c['cpt_tokens'] / base['params'], base['tokens_per_param'], c)
             for base in summary['bases'] for c in base['budgets'].values() if c.get('cpt_tokens')]
    groups: list[tuple[float, dict]] = []
    for per_param, tpp, c in sorted(cells, key=lambda x: x[0]):
        if groups and abs(per_param / groups[-1][0] - 1) < 0.05 and tpp not in groups[-1][1]:
            groups[-1][1][tpp] = c
        else:
            groups.append((per_param, {tpp: c}))
    return [g for g in groups if len(g[1]) > 1]


def render(summary: Mapping[str, Any]) -> str:
    budgets = sorted({b for base in summary['bases'] for b in base['budgets']}, key=float)
    lines = ['# Upcycling vs CPT against the dense base\'s pretraining length', '',
             'One full study per base (`tpp<N>/report.md`), each with its own lr sweep on its validation split. Each '
             'cell: test-split domain CE of the upcycled arm minus CPT\'s (negative = upcycling ahead), its 95% '
             'interval and the verdict, by the study\'s paired test (paired t over seeds + held-out-document noise).',
             '',
             f'![gain vs pretraining length]({FIGURE})', '',
             '| base tokens/param | base domain CE | regime | ' + ' | '.join(f'budget {b}' for b in budgets) + ' |',
             '|---|---|---|' + '---|' * len(budgets)]
    for base in summary['bases']:
        cells = [_cell(base['budgets'].get(b) or {}) for b in budgets]
        lines.append(f'| {base["tokens_per_param"]:.1f} | {base["base_ce_domain"]:.3f} | {base["regime"]} | '
                     + ' | '.join(cells) + ' |')
    lines += ['', 'The lrs each base chose (CPT / upcycled): ' + '; '.join(
        f'{b["tokens_per_param"]:.0f} tokens/param: ' + ' / '.join(f'{v:g}' for v in b['lrs'].values())
        for b in summary['bases'] if b.get('lrs')) + '.', '']
    groups = equal_tokens(summary)
    lines += ['## At equal phase-2 tokens', '']
    if not groups:
        lines.append('No two bases trained the same number of phase-2 tokens (budgets are fractions of each base\'s '
                     'own pretraining; pick budgets b and b * N / M for bases of N and M tokens/param).')
    else:
        tpps = sorted({t for _, g in groups for t in g})
        lines += ['Budgets are fractions of each base\'s own pretraining, so a longer-trained base also trains '
                  'longer in phase 2. These cells compare bases after the same phase-2 length:', '',
                  '| phase-2 CPT tokens per parameter | ' + ' | '.join(f'base {t:.0f} tokens/param' for t in tpps)
                  + ' |', '|---|' + '---|' * len(tpps)]
        for per_param, g in groups:
            lines.append(f'| {per_param:.2f} | ' + ' | '.join(_cell(g.get(t) or {}) for t in tpps) + ' |')
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
                        yerr=[(c['ci'][1] - c['gap']) if c.get('ci') else 0.0 for _, c in pts], fmt='o-', capsize=3,
                        label=f'budget {b}')
    ax.axhline(0, color='black', lw=0.8)
    ax.set_xscale('log')
    ax.set_xlabel('dense base: pretraining tokens per parameter')
    ax.set_ylabel('upcycled - CPT held-out domain CE (nats; < 0: upcycling ahead)')
    ax.set_title('Upcycling\'s gain against the base\'s training length (bars: 95% CI)')
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

