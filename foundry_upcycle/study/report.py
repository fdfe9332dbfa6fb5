"""The study report: `report.md` (its sections: study/sections.py; its PNG figures: study/figures.py) from a
results.json. A winner is named only when the paired test's 95% interval excludes zero (results['comparisons']).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from foundry_upcycle.atomic import atomic_write
from foundry_upcycle.study.arms import label as arm_label
from foundry_upcycle.study.arms import short as arm_short
from foundry_upcycle.study.figures import (FIGURES, ROUTER_FIGURE, plot_figure1, plot_figure4, plot_loss_curves,
                                           plot_router, plot_throughput, router_summary)
from foundry_upcycle.study.results_view import arm_names, budgets_of, check_results, eval_value, find_arm, num
from foundry_upcycle.study.sections import (ce_winner, epoch_lines, eval_set_lines, fmt, fmt_int, lr_lines,
                                            regime_lines, router_lines, table, test_lines, timing_lines,
                                            verdict_lines)
from foundry_upcycle.study.variant_table import router_figure, variant_arms, variant_lines

__all__ = ['write_report', 'render_markdown', 'ce_winner', 'FIGURES', 'ROUTER_FIGURE', 'router_summary',
           'check_results']

TINY_PARAMS = 100_000_000     # below this the report warns that gauntlet scores are near chance


def _pm(entry: Optional[Mapping[str, Any]], metric: str, spec: str = '.4f') -> str:
    """'mean ± std (n)' of an eval metric over seeds."""
    if not entry:
        return 'n/a'
    mean = eval_value(entry, metric)
    std = num((entry.get('eval_std') or {}).get(metric))
    n = entry.get('n_seeds') or 1
    if mean is None:
        return 'n/a'
    return f'{mean:{spec}} ± {std:{spec}}' if std is not None else f'{mean:{spec}}' + (' (1 seed)' if n == 1 else '')


def _results_table(results: Mapping[str, Any]) -> list[str]:
    header = ['budget', 'arm', 'lr', 'seeds', 'tokens', 'steps', 'train FLOPs', 'active / total params',
              'final train CE (last 5%)', 'test generic CE', 'test domain CE (mean ± std)', 'core average']
    dense = results.get('dense') or {}
    rows = [['0 (base)', 'dense', fmt(dense.get('pretrain_lr'), 'g'), '1', fmt_int(dense.get('pretrain_tokens')),
             fmt_int(dense.get('pretrain_steps')), fmt(dense.get('pretrain_flops'), '.3g'), fmt_int(dense.get('params')),
             fmt(dense.get('train_ce_final')), fmt(eval_value(dense, 'ce_generic')), fmt(eval_value(dense, 'ce_domain')),
             fmt(eval_value(dense, 'core_average'), '.3f')]]
    for b in budgets_of(results):
        for arm in arm_names(results):
            a = find_arm(results, arm, b)
            if a is None:
                rows.append([f'{b:g}', arm_label(arm), 'missing'] + [''] * 9)
                continue
            params = f'{fmt_int(a.get("active_params"))} / {fmt_int(a.get("total_params"))}'
            rows.append([f'{b:g}', arm_label(arm), fmt(a.get('lr'), 'g'), str(a.get('n_seeds', 1)),
                         fmt_int(a.get('tokens')), fmt_int(a.get('steps')), fmt(a.get('train_flops'), '.3g'), params,
                         fmt(a.get('train_ce_final')),
                         _pm(a, 'ce_generic'), _pm(a, 'ce_domain'), _pm(a, 'core_average', '.3f')])
    return table(header, rows)


def _task_table(results: Mapping[str, Any]) -> list[str]:
    columns = [('dense base', results.get('dense'))] + [
        (f'{arm_short(a["arm"])} {a["budget"]:g}', a)
        for a in sorted(results['arms'], key=lambda a: (a['budget'], a['arm']))]
    tasks = sorted({t for _, e in columns for t in (((e or {}).get('eval') or {}).get('tasks') or {})})
    if not tasks:
        return ['No per-task scores were recorded.']
    rows = [[t] + [fmt((((e or {}).get('eval') or {}).get('tasks') or {}).get(t), '.3f') for _, e in columns]
            for t in tasks]
    return table(['task'] + [c for c, _ in columns], rows)


def render_markdown(results: Mapping[str, Any], figures: Mapping[str, str],
                    extra_sections: Sequence[str] = (), router: Optional[Mapping[str, Any]] = None) -> str:
    budgets = budgets_of(results)
    dense = results.get('dense') or {}
    ratio = num(results.get('token_ratio'))
    missing = results.get('missing_eval_tasks') or []
    rw = results.get('router_weights') or 'renormalized'
    top = next((a for a in results['arms'] if a['budget'] == max(budgets)), {})
    lines = [
        '# Continued pretraining vs sparse upcycling',
        '',
        f'A dense base model ({fmt_int(dense.get("params"))} parameters, pretrained on '
        f'{fmt_int(dense.get("pretrain_tokens"))} tokens) was trained further on the domain mix in two ways at '
        f'matched training FLOPs: continued pretraining of the dense model (CPT), and upcycling it into a '
        f'mixture of experts. Budgets are fractions of the dense pretraining FLOPs: '
        f'{", ".join(f"{b:g}" for b in budgets)}; {top.get("n_seeds", 1)} seed(s) at the largest.'
        + (f' Router weights: **{rw}** (ablation: softmax over all experts, top-k without renormalisation, '
           'He et al. 2024).' if rw != 'renormalized' else ''),
        '',
        f'**Upcycled / CPT token ratio at matched FLOPs: {fmt(ratio, ".3f")}** (the MoE spends more FLOPs per '
        'token on its active experts, so it sees fewer tokens; the paper reports about 0.75 for its 436M model '
        'and 0.68 for 1.4B).',
        '',
        '## Regime',
        '',
        *regime_lines(results),
        '',
        '## Held-out domain cross-entropy (test split): which arm is ahead',
        '',
        *verdict_lines(results, 'ce_domain'),
        '',
        *test_lines(),
        '',
        *eval_set_lines(results),
        '',
        *epoch_lines(results),
        '',
        '## Forgetting: held-out generic cross-entropy (test split)',
        '',
        *verdict_lines(results, 'ce_generic'),
        '',
        '## Core average (eval gauntlet v0.3, chance-normalised): which arm is ahead',
        '',
        *verdict_lines(results, 'core_average'),
        '',
        *(['## Upcycling variants: each against CPT and against the paper\'s recipe', '', *variants, '']
          if (variants := variant_lines(results, router is not None)) else []),
        '## Learning rates',
        '',
        *lr_lines(results),
        '',
        '## Results',
        '',
    ]
    lines += _results_table(results)
    lines += ['', 'CE: cross-entropy in nats/token, lower is better; ± is the standard deviation over seeds. Core '
              'average: eval gauntlet v0.3, chance-normalised (0 = random guessing). Final train CE: '
              f'{results.get("train_ce_definition", "mean over the last steps")}.', '', '## Figures', '',
              f'![Figure 1]({figures["figure1"]})', '',
              'Figure 1 (as in the paper): left, relative core-average gain of upcycling over CPT where CPT is '
              'significantly above chance (otherwise both core averages with 95% intervals); right, test-split domain '
              'CE (mean over seeds, bars: 95% interval over seeds) and final training CE of every arm.', '',
              f'![Figure 4]({figures["figure4"]})', '',
              'Figure 4 (as in the paper): core average of both arms, with the dense base as a horizontal line.', '',
              f'![Training loss]({figures["loss"]})', '',
              'Training loss of both arms at each budget (seed 0), against tokens seen.', '',
              '## Router health', '', *router_lines(results, router), '',
              '## Step time', '', f'![Step times]({figures["throughput"]})', '', *timing_lines(results)]
    lines += ['', '## Evaluation coverage', '']
    if missing:
        lines.append(f'Tasks not evaluated (no data, or not selected): {", ".join(sorted(missing))}. Foundry drops '
                     'a category with any missing task; our core average is over the tasks present.')
    else:
        lines.append('No eval tasks were missing.')
    lines += ['', '### Per-task scores (mean over seeds)', '']
    lines += _task_table(results)
    lines += ['', '## Caveats', '']
    params = num(dense.get('params'))
    if params is None or params < TINY_PARAMS:
        lines.append(f'This is a tiny model ({fmt_int(params)} parameters). Its eval gauntlet scores sit near chance '
                     'level, so the core average mostly measures noise (its error bars say how much); held-out '
                     'cross-entropy is the meaningful measurement at this scale. The paper\'s findings were made at '
                     '436M and 1.4B parameters on tens to hundreds of billions of tokens.')
        lines.append('')
    lines.append('A verdict needs at least 2 paired seeds; with one there is no verdict. The lrs were chosen on the '
                 'validation split; every verdict uses the test split, which chose nothing.')
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
    for arm in variant_arms(results):        # each variant's router health (fine-grained: E*G experts)
        summary = router_summary(results, arm)
        if summary is not None:
            plot_router(summary, out / router_figure(arm))
    text = render_markdown(results, FIGURES, extra_sections, router)
    report = out / 'report.md'
    atomic_write(str(report), lambda tmp: Path(tmp).write_text(text, encoding='utf-8'))
    return report
