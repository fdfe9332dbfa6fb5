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
                     f'held-out validation {toks["generic/val"]:,} generic and {toks["domain/val"]:,} domain tokens.')
    lines.append(f'Each arm\'s steps are its FLOP-matched token budget ({plan.flops["cpt"]:.3g} training FLOPs per '
                 f'token dense, {plan.flops["upcycle"]:.3g} upcycled, i.e. 6 x active non-embedding + LM-head '
                 'parameters + attention) rounded to whole steps; each phase-2 run has a fresh linear warm-up over '
                 f'{100 * cfg.warmup_fraction:g}% of its steps, then cosine decay to 0.')
    lines.append(f'Seeds: {cfg.seeds} at the largest budget, {cfg.seeds_other} at the others; phase-2 seed i trains '
                 f'with seed {cfg.seed} + i (data order) and router seed (block seed + i).')
    lines.append(f'Training CE is the {results["train_ce_definition"]}.')
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
