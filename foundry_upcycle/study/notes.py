"""The report's "How this study ran" section: steps, CE windows, warm-ups, seeds, data, stage times, load."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from foundry_upcycle.study.results import WALL_CLOCK_FIELDS


def study_notes(results: Mapping[str, Any], study) -> str:
    """A report section on how the numbers were made: steps, CE windows, warmups, seeds, data, timings."""
    cfg, plan = study.cfg, study.plan
    lines = ['## How this study ran']
    lines.append(f'Scale `{cfg.scale}`, base seed {cfg.seed}; recipes ' + ', '.join(
        f'`{Path(cfg.recipe_path(k)).name}`' for k in ((('pretrain',) if cfg.pretrains else ()) + ('cpt', 'upcycle'))) +
        f'; training sequence length {plan.seq_len}, {plan.tokens_per_step:,} tokens per step in every run; '
        f'{cfg.threads or "default"} torch threads.')
    if study.data is not None:
        toks = study.data.tokens
        lines.append(f'Data: {toks["generic/train"]:,} generic and {toks["domain/train"]:,} domain training tokens; '
                     f'validation {toks["generic/val"]:,} generic and {toks["domain/val"]:,} domain tokens (the domain '
                     f'validation split chooses the lrs); test {toks["generic/test"]:,} generic and '
                     f'{toks["domain/test"]:,} domain tokens (reported, chose nothing). No file is in two splits; a '
                     'play or poem is cut into chapters, which may sit in different splits.')
    lines.append(f'Each arm\'s steps are its FLOP-matched token budget ({plan.flops["cpt"]:.3g} training FLOPs per '
                 f'token dense, {plan.flops["upcycle"]:.3g} upcycled, i.e. 6 x active non-embedding + LM-head '
                 'parameters + attention) rounded to whole steps; each phase-2 run has a fresh linear warm-up over '
                 f'{100 * cfg.warmup_fraction:g}% of its steps, then cosine decay to 0.')
    lines.append(f'Seeds: {cfg.seeds} at the largest budget, {cfg.seeds_other} at the others; phase-2 seed i trains '
                 f'with seed {cfg.seed} + i (data order) and router seed (block seed + i).')
    metric = ', '.join(f'`{m}`' for m in results.get('train_ce_metric') or []) or 'not logged'
    lines.append(f'Training CE is the {results["train_ce_definition"]}, of the logged metric {metric}.')
    lines.append('Wall-clock fields of results.json (`' + '`, `'.join(WALL_CLOCK_FIELDS) + '`) change between '
                 'identical runs; everything else is reproducible.')
    tasks = sorted((results['dense'].get('eval') or {}).get('tasks') or {})
    if tasks:
        examples = (results['dense'].get('eval') or {}).get('icl_examples') or {}
        lines.append('ICL tasks evaluated (examples each): ' + ', '.join(f'{t} ({examples.get(t, "?")})'
                                                                          for t in tasks) + '. ' +
                     f'Eval data: `{results["config"]["eval"]["local_data"]}`. '
                     'The core average here is over the categories with at least one evaluated task.')
    else:
        lines.append('No ICL tasks were evaluated (no eval data); there is no core average.')
    clock = results['wall_clock']
    wall = clock['stages_s']
    lines.append('Stage times (s, this machine): ' + ', '.join(f'{k} {v:.0f}' for k, v in wall.items()) + '.')
    jobs = clock.get('jobs') or 1
    if jobs > 1:
        lines.append(f'Phase-2 runs trained {jobs} at a time in worker processes ({cfg.threads or "default"} torch '
                     f'thread(s) each; the numbers do not depend on it), so their `train_seconds` were measured with '
                     f'{jobs} runs sharing the machine; the step-time ratio comes from the timing stage, run alone.')
    if clock.get('elapsed_s') is not None:
        start = clock.get('load_average_start') or []
        busy = bool(start) and clock.get('cpu_count') and start[0] > 0.5 * clock['cpu_count']
        lines.append(f'Whole study until results.json: {clock["elapsed_s"]:.0f} s on {clock.get("cpu_count")} CPUs; '
                     f'load average (1/5/15 min) {start} at the start and {clock.get("load_average_end")} at the '
                     'end (the study\'s own runs count in the latter). ' +
                     ('**The machine was busy before the study started: its times are pessimistic.**' if busy else
                      'The machine was idle at the start.'))
    return '\n\n'.join(lines) + '\n'


def plan_lines(p, cfg) -> list[str]:
    """The plan, as the study prints it before training: sizes, FLOPs per token, token ratios, steps per budget."""
    from foundry_upcycle.study import arms
    base = arms.BASELINE
    lines = [f'plan: dense {p.params[base][0]:,} params, training FLOPs per token {p.flops[base]:.3g}; '
             + '; '.join(f'{arms.short(a)} {p.params[a][0]:,} total / {p.params[a][1]:,} active params, '
                         f'{p.flops[a]:.3g} FLOPs per token, token ratio at matched FLOPs '
                         f'{p.flops[base] / p.flops[a]:.3f}' for a in p.arms if a != base)]
    if p.pretrain_steps:
        lines.append(f'  dense base: {p.pretrain_steps} steps, {p.pretrain_tokens:,} tokens = '
                     f'{p.pretrain_tokens / p.params[base][0]:.1f} tokens per parameter')
    for b in cfg.budgets:
        lines.append(f'  budget {b:g}: ' + ', '.join(f'{arms.short(a)} {p.steps[(a, b)]} steps' for a in p.arms) +
                     f' ({p.tokens_per_step:,} tokens per step), {cfg.seeds_at(b)} seed(s)')
    return lines
