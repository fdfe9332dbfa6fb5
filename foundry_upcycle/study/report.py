"""The study report: `report.md` (and, through study/figures.py, its PNG figures) from a results.json.

A winner is named only when the gap exceeds twice its standard error (results['comparisons']).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from foundry_upcycle.atomic import atomic_write
from foundry_upcycle.study import arms as arm_registry
from foundry_upcycle.study.arms import short as arm_short
from foundry_upcycle.study.arms import label as arm_label
from foundry_upcycle.study.figures import (FIGURES, ROUTER_FIGURE, plot_figure1, plot_figure4, plot_loss_curves,
                                           plot_router, plot_throughput, router_summary)
from foundry_upcycle.study.results_view import (arm_names, budgets_of, check_results, eval_value,
                                                find_arm, flop_ratio, num)
from foundry_upcycle.study.variant_table import router_figure, variant_arms, variant_lines

TINY_PARAMS = 100_000_000     # below this the report warns that gauntlet scores are near chance


def comparison(results: Mapping[str, Any], arm: str, budget: float, metric: str) -> Optional[Mapping[str, Any]]:
    return (((results.get('comparisons') or {}).get(arm) or {}).get(f'{budget:g}') or {}).get(metric)


def ce_winner(results: Mapping[str, Any], budget: float, metric: str = 'ce_domain',
              arm: str = arm_registry.PRIMARY) -> tuple[str, str]:
    """(arm | baseline | 'within noise' | 'n/a', a sentence) for one arm against the baseline at one budget."""
    c = comparison(results, arm, budget, metric)
    if not c or c.get('value') is None or c.get('baseline_value') is None:
        return 'n/a', 'not measured (an arm or its value is missing)'
    fmt = '.4f' if metric.startswith('ce') else '.3f'
    values = (f'{c["value"]:{fmt}} ({arm_short(arm)}) vs {c["baseline_value"]:{fmt}} '
              f'({arm_short(c["baseline"])})')
    gap = abs(c['value'] - c['baseline_value'])
    if c['winner'] == 'n/a':
        return 'n/a', f'{values}: no noise estimate (one seed), no verdict'
    se = f'gap {gap:{fmt}}, 2 SE = {2 * c["se"]:{fmt}}'
    if c['winner'] == 'within noise':
        return 'within noise', f'within noise: {values}, {se}'
    return c['winner'], f'**{arm_label(c["winner"])}** ahead: {values}, {se}'


def _f(x: Any, spec: str = '.4f') -> str:
    v = num(x)
    return 'n/a' if v is None else format(v, spec)


def _int(x: Any) -> str:
    v = num(x)
    return 'n/a' if v is None else f'{int(v):,}'


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)] + ['| ' + ' | '.join(r) + ' |' for r in rows]


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
              'final train CE (last 5%)', 'held-out generic CE', 'held-out domain CE (mean ± std)', 'core average']
    dense = results.get('dense') or {}
    rows = [['0 (base)', 'dense', _f(dense.get('pretrain_lr'), 'g'), '1', _int(dense.get('pretrain_tokens')),
             _int(dense.get('pretrain_steps')), _f(dense.get('pretrain_flops'), '.3g'), _int(dense.get('params')),
             _f(dense.get('train_ce_final')), _f(eval_value(dense, 'ce_generic')), _f(eval_value(dense, 'ce_domain')),
             _f(eval_value(dense, 'core_average'), '.3f')]]
    for b in budgets_of(results):
        for arm in arm_names(results):
            a = find_arm(results, arm, b)
            if a is None:
                rows.append([f'{b:g}', arm_label(arm), 'missing'] + [''] * 9)
                continue
            params = f'{_int(a.get("active_params"))} / {_int(a.get("total_params"))}'
            rows.append([f'{b:g}', arm_label(arm), _f(a.get('lr'), 'g'), str(a.get('n_seeds', 1)),
                         _int(a.get('tokens')), _int(a.get('steps')), _f(a.get('train_flops'), '.3g'), params, _f(a.get('train_ce_final')),
                         _pm(a, 'ce_generic'), _pm(a, 'ce_domain'), _pm(a, 'core_average', '.3f')])
    return _table(header, rows)


def _regime_lines(results: Mapping[str, Any]) -> list[str]:
    r = results.get('regime') or {}
    if not r:
        return ['The results do not record the regime.']
    tpp, chance, base = num(r.get('base_tokens_per_param')), num(r.get('chance_ce')), num(r.get('base_ce_domain'))
    slope = num(r.get('cpt_slope_per_doubling'))
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
    names = arm_names(results)
    lines = ['Phase-2 learning rates: ' + ', '.join(f'{arm_short(a)} {_f(lr.get(a), "g")}' for a in names) + ' '
             f'(source: {lr.get("source")}; the paper picked each arm\'s lr by a sweep at its shortest budget, then '
             'kept it for all budgets).']
    sweep = lr.get('sweep')
    if sweep:
        lines += ['', f'Sweep at budget {sweep["budget"]:g} (seed 0), held-out domain CE:', '']
        lines += _table(['lr'] + [arm_label(a) for a in names], [[f'{r["lr"]:g}'] + [_f(r.get(a)) for a in names]
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
    if not t or num(t.get('ratio')) is None:
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
        f'{arm_label(a["arm"])} @ {a["budget"]:g}: {_f(a.get("tokens_per_s"), ",.0f")}' for a in results['arms']) + '.']


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
    budgets = budgets_of(results)
    lines: list[str] = []
    base = arm_registry.BASELINE
    for arm in arm_names(results)[1:]:
        winners = {b: ce_winner(results, b, metric, arm) for b in budgets}
        tally = {w: sum(1 for v, _ in winners.values() if v == w) for w in (arm, base, 'within noise', 'n/a')}
        lines += [f'- budget {b:g}: {text}' for b, (_, text) in winners.items()]
        lines += ['', f'{arm_label(arm)} ahead at {tally[arm]}, {arm_label(base)} ahead at {tally[base]}, within '
                  f'noise at {tally["within noise"]} of {len(budgets)} budgets' +
                  (f' ({tally["n/a"]} without a verdict)' if tally['n/a'] else '') +
                  ' (ahead = the gap exceeds 2 standard errors).', '']
    return lines[:-1]


def _task_table(results: Mapping[str, Any]) -> list[str]:
    columns = [('dense base', results.get('dense'))] + [
        (f'{arm_short(a["arm"])} {a["budget"]:g}', a)
        for a in sorted(results['arms'], key=lambda a: (a['budget'], a['arm']))]
    tasks = sorted({t for _, e in columns for t in (((e or {}).get('eval') or {}).get('tasks') or {})})
    if not tasks:
        return ['No per-task scores were recorded.']
    rows = [[t] + [_f((((e or {}).get('eval') or {}).get('tasks') or {}).get(t), '.3f') for _, e in columns]
            for t in tasks]
    return _table(['task'] + [c for c, _ in columns], rows)


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
        *(['## Upcycling variants: each against CPT and against the paper\'s recipe', '', *variants, '']
          if (variants := variant_lines(results, router is not None)) else []),
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
    params = num(dense.get('params'))
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
    for arm in variant_arms(results):        # each variant's router health (fine-grained: E*G experts)
        summary = router_summary(results, arm)
        if summary is not None:
            plot_router(summary, out / router_figure(arm))
    text = render_markdown(results, FIGURES, extra_sections, router)
    report = out / 'report.md'
    atomic_write(str(report), lambda tmp: Path(tmp).write_text(text, encoding='utf-8'))
    return report
