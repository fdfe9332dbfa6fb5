"""Is upcycling worth its inference cost? Joins the study's results.json with the benchmark's inference.json.

In the spirit of Sardana & Frankle, "Beyond Chinchilla-Optimal: Accounting for Inference in Language Model
Scaling Laws" (2024): count training and inference compute together. At budget b the upcycled MoE trains with
compute C_b and reaches quality q_up. The dense CPT model reaches q_up with compute C* read off the CPT
quality-vs-compute curve (interpolated in log compute between measured budgets, extrapolated past the largest
from a line fitted to the last few, "never" if that line is flat), so it needs dC = C* - C_b extra training FLOPs
but serves each token for df fewer FLOPs. Total compute is equal at N* = dC / df tokens processed (prompt +
generated): below N* the upcycled model gives that quality for less, above N* the longer-trained dense model does.
Three bases, side by side:
  flops       df from FLOPs (forward = training FLOPs per token / 3); a training and a serving FLOP cost the same.
  throughput  df from the measured throughput ratio, priced in dense-model FLOPs: df = f_dense * (T_dense / T_moe
              - 1). This assumes serving runs at the training MFU, which it rarely does.
  seconds     measured time on both sides: the CPT seconds needed (read off the CPT curve of training seconds,
              from results.json `train_seconds`) minus the upcycled run's seconds, over the extra serving seconds
              per processed token (1 / T_moe - 1 / T_dense, from the benchmark). Absent inputs are reported
              missing, never invented.
results.json schemas 1-3 are read (bench/cost_inputs.py); the break-even arithmetic is bench/breakeven.py, the
markdown bench/cost_text.py.

Pure Python (plus Matplotlib for the figure). Entry points: `cost_report`, `build_cost`, `render_cost_section`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from foundry_upcycle.atomic import atomic_write_files

from .breakeven import FAR_EXTRAPOLATION, break_even, match_compute, seconds_break_even
from .cost_inputs import (measured_cost, normalized_arms, read_json, study_top_k, training_top_k, validate_inference,
                          validate_results)
from .cost_text import render_cost_section
from .outputs import dump_json

__all__ = ['build_cost', 'cost_report', 'render_cost_section', 'validate_results', 'validate_inference',
           'match_compute']

SCHEMA = 2
BASES = ('seconds', 'flops', 'throughput')
METRICS = {'ce_domain': 'lower', 'core_average': 'higher'}  # quality metric -> which direction is better
PRIMARY_METRIC = 'ce_domain'
THROUGHPUT_METRICS = ('total_tokens_per_s', 'output_tokens_per_s')

_NUMBER = (int, float)


def _arm(results: dict[str, Any], kind: str, budget: float) -> dict[str, Any]:
    return next(a for a in results['arms'] if a['arm'] == kind and math.isclose(a['budget'], budget))


def _sign(metric: str) -> float:
    return 1.0 if METRICS[metric] == 'lower' else -1.0  # loss = sign * value (lower is better)


def cpt_curve(results: dict[str, Any], metric: str) -> dict[str, list]:
    arms = sorted((a for a in results['arms'] if a['arm'] == 'cpt' and a['eval'][metric] is not None),
                  key=lambda a: a['train_flops'])
    return {'budgets': [a['budget'] for a in arms], 'train_flops': [a['train_flops'] for a in arms],
            'train_seconds': [a['train_seconds'] for a in arms], 'values': [a['eval'][metric] for a in arms]}



def _gains(cpt: dict[str, Any], up: dict[str, Any], verdicts: dict[str, Any]) -> dict[str, Any]:
    """Gain of upcycling per metric (positive = upcycling better) and its verdict: the study's paired test
    (results.json schema 3 `comparisons`: winner, 95% interval, test), else (schemas 1-2) the 2-standard-error rule,
    labelled as such. `<metric>_verdict`: 'upcycle' | 'cpt' | 'tie' | 'n/a' (no noise estimate: not a verdict)."""
    out: dict[str, Any] = {}
    for metric in METRICS:
        a, b = cpt['eval'][metric], up['eval'][metric]
        gain = None if a is None or b is None else _sign(metric) * (a - b)
        out[f'{metric}_gain'] = gain
        c = verdicts.get(metric)
        if c is not None:
            ci = c.get('ci')
            out[f'{metric}_gain_ci'] = None if ci is None else sorted(-_sign(metric) * x for x in ci)
            out[f'{metric}_test'] = c.get('test')
            out[f'{metric}_verdict'] = c['winner'] if c['winner'] in ('upcycle', 'cpt', 'tie') else 'n/a'
            continue
        sems = [arm['eval_sem'].get(metric) for arm in (cpt, up)]
        sem = math.hypot(*sems) if gain is not None and all(isinstance(x, _NUMBER) for x in sems) else None
        out[f'{metric}_gain_ci'] = None if sem is None else [gain - 2 * sem, gain + 2 * sem]
        out[f'{metric}_test'] = None if sem is None else 'gap against 2 standard errors (unpaired; results schema < 3)'
        out[f'{metric}_verdict'] = ('n/a' if sem is None or gain is None else 'tie' if abs(gain) <= 2 * sem
                                    else 'upcycle' if gain > 0 else 'cpt')
    core = cpt['eval']['core_average']
    out['core_average_gain_rel'] = (out['core_average_gain'] / core
                                    if out['core_average_gain'] is not None and core else None)
    return out


def _per_cost(gains: dict[str, Optional[float]], extra_cost: dict[str, float]) -> dict[str, Any]:
    """Quality gained per +100% inference cost per token (None where the MoE costs no more)."""
    return {basis: {metric: (None if gains[f'{metric}_gain'] is None or cost <= 0
                             else gains[f'{metric}_gain'] / cost) for metric in METRICS}
            for basis, cost in extra_cost.items()}


def _budget_row(results: dict[str, Any], budget: float, curves: dict[str, dict], measured: dict[str, Any],
                tail_points: int, saturation_tol: float) -> dict[str, Any]:
    cpt, up = _arm(results, 'cpt', budget), _arm(results, 'upcycle', budget)
    f_dense = cpt['flops_per_token'] / 3.0  # forward-only inference FLOPs per token
    f_moe = up['flops_per_token'] / 3.0
    df = {'throughput': f_dense * measured['extra_cost'], 'flops': f_moe - f_dense}
    extra_cost = {'seconds': measured['extra_cost'], 'throughput': measured['extra_cost'],
                  'flops': f_moe / f_dense - 1.0}
    verdicts = ((results.get('comparisons') or {}).get('upcycle') or {}).get(f'{budget:g}') or {} \
        if results.get('schema', 0) >= 3 else {}
    gains = _gains(cpt, up, verdicts)
    row = {
        'budget': budget,
        'cpt': _arm_summary(cpt), 'upcycle': _arm_summary(up), **gains,
        'extra_cost_per_token': extra_cost, 'extra_inference_flops_per_token': df,
        'extra_serving_seconds_per_token': measured['extra_seconds_per_token'],
        'quality_per_extra_cost': _per_cost(gains, extra_cost), 'break_even': {},
    }
    for metric, curve in curves.items():
        start = next((i for i, b in enumerate(curve['budgets']) if math.isclose(b, budget)), None)
        if up['eval'][metric] is None or start is None:
            row['break_even'][metric] = None
            continue
        sign = _sign(metric)
        losses, target = [sign * v for v in curve['values']], sign * up['eval'][metric]
        match = match_compute(curve['train_flops'], losses, start, target, tail_points, saturation_tol)
        be = break_even(match, cpt['train_flops'], df, cpt['tokens'])
        seconds_break_even(be, curve, start, losses, target, up['train_seconds'],
                            measured['extra_seconds_per_token'], cpt['tokens'], tail_points, saturation_tol)
        row['break_even'][metric] = be
    return row


def _arm_summary(arm: dict[str, Any]) -> dict[str, Any]:
    return {'tokens': arm['tokens'], 'train_flops': arm['train_flops'], 'flops_per_token': arm['flops_per_token'],
            'train_seconds': arm['train_seconds'], 'n_seeds': arm['n_seeds'],
            **{m: arm['eval'][m] for m in METRICS}}


def build_cost(results: dict[str, Any], inference: dict[str, Any], *, top_k: Optional[int] = None,
               tail_points: int = 3, saturation_tol: float = 1e-3,
               throughput_metric: str = 'total_tokens_per_s') -> dict[str, Any]:
    """The cost report (cost.json content) from the two parsed files."""
    validate_results(results)
    validate_inference(inference)
    results = {**results, 'arms': normalized_arms(results)}
    if throughput_metric not in THROUGHPUT_METRICS:
        raise ValueError(f'throughput_metric must be one of {THROUGHPUT_METRICS}, got {throughput_metric!r}')
    if tail_points < 2:
        raise ValueError(f'tail_points must be >= 2, got {tail_points}')
    notes = []
    if top_k is None:
        top_k, note = study_top_k(results, inference)
        notes += [note] if note else []
    measured = measured_cost(inference, top_k, throughput_metric)
    curves = {m: cpt_curve(results, m) for m in METRICS}
    budgets = [_budget_row(results, b, curves, measured, tail_points, saturation_tol)
               for b in sorted(results['budgets'])]
    return {
        'schema': SCHEMA, 'results_schema': results['schema'], 'primary_metric': PRIMARY_METRIC, 'top_k': top_k,
        'training_top_k': training_top_k(results),
        'settings': {'tail_points': tail_points, 'saturation_tol': saturation_tol,
                     'throughput_metric': throughput_metric, 'far_extrapolation': FAR_EXTRAPOLATION},
        'inference': {**measured, 'engine': inference['environment']['engine'],
                      'device': inference['environment']['device'],
                      'device_name': inference['environment'].get('device_name'),
                      'workload': {k: inference['workload'][k] for k in ('input_tokens', 'output_tokens')}},
        'study': {'dense_params': results['dense']['params'],
                  'dense_flops_per_token': results['dense']['flops_per_token'],
                  'pretrain_flops': results['dense']['pretrain_flops'],
                  'missing_eval_tasks': results.get('missing_eval_tasks') or []},
        'cpt_curves': curves, 'budgets': budgets,
        'assumptions': assumptions(tail_points, saturation_tol, throughput_metric),
        'warnings': notes + warnings(results, inference, measured, top_k),
    }


def assumptions(tail_points: int, saturation_tol: float, throughput_metric: str) -> list[str]:
    return [
        'Quality is the domain cross-entropy (primary; lower is better) and the core average (higher is better) '
        'of the study\'s evaluations; "same quality" means equal on that metric. With several seeds, a gain '
        'smaller than two standard errors is called a tie.',
        'Each CPT budget is its own run with its own schedule; together they are read as one CPT '
        'quality-vs-training-compute curve. Between budgets the curve is linear in log compute.',
        f'Past the largest CPT budget the curve continues along a least-squares line of quality vs log2(compute) '
        f'over the last {tail_points} CPT budgets. This log-linear extrapolation is optimistic for CPT (its gains '
        'shrink as it saturates, the paper\'s finding), so extrapolated break-evens favour CPT. If that line '
        f'improves by less than {saturation_tol:g} (metric units) per doubling of compute, CPT has saturated and no '
        f'amount of it matches: break-even "never". Extrapolations beyond {FAR_EXTRAPOLATION:g}x the largest CPT '
        'compute are flagged as unreliable.',
        'The CPT run is continued from the same dense checkpoint; the dense pretraining is a sunk cost shared by '
        'both options. Both arms use the same training FLOPs at a budget (the study matches FLOPs), not the same '
        'seconds.',
        'Tokens served means tokens processed: prompt + generated, as the benchmark\'s throughput counts them '
        f'({throughput_metric.replace("_", " ")}).',
        'FLOP basis: inference FLOPs per token = training FLOPs per token / 3 (forward 2N of the training 6N, '
        'attention included as the study counts it); a training FLOP and a serving FLOP cost the same.',
        'Throughput basis: the MoE costs T_dense / T_moe times the dense model per token (benchmark max '
        'throughput), priced in dense inference FLOPs at the training price per FLOP. This assumes serving runs '
        'at the training MFU; it usually runs lower, so this basis overstates break-even in upcycling\'s favour.',
        'Seconds basis: measured time on both sides. Extra CPT training seconds to match the upcycled quality '
        '(CPT curve of training seconds minus the upcycled run\'s seconds) over the extra serving seconds per '
        'processed token (1/T_moe - 1/T_dense). A training second and a serving second of the benchmarked '
        'hardware cost the same; if they ran on different hardware, rescale by the price ratio.',
        'Break-even lifetime demand N* = extra CPT training cost to match the upcycled quality / extra serving '
        'cost per processed token. Below N*, upcycling reaches that quality for less in total; above N*, '
        'training the dense model longer is cheaper.',
        'Latency targets and memory (the MoE holds all experts) are not priced.',
    ]


def warnings(results: dict[str, Any], inference: dict[str, Any], measured: dict[str, Any],
             top_k: int) -> list[str]:
    out = []
    env = inference['environment']
    if env['device'] != 'cuda' or env['engine'] != 'vllm':
        out.append(f"Throughput was measured with engine {env['engine']} on {env['device']}: the measured ratio may "
                   'not carry over to GPU serving with vLLM; the FLOP basis is hardware-independent.')
    trained = training_top_k(results)
    if trained is not None and trained != top_k:
        out.append(f'Inference is priced at top-{top_k} but the MoE was trained with top-{trained}: its quality '
                   f'at top-{top_k} was not measured, so the quality side of the comparison is for top-{trained}.')
    study, bench = results['dense']['params'], measured['dense_params']
    if not 0.67 <= bench / study <= 1.5:
        out.append(f'The benchmarked dense model has {bench:,} parameters, the study\'s {study:,}: the measured '
                   'throughput ratio is a proxy from another shape.')
    if any(a['train_seconds'] is None for a in results['arms']):
        out.append('Some arms have no training seconds in results.json: the seconds basis is missing for them.')
    clock = results.get('wall_clock') or {}
    jobs, load, cpus = clock.get('jobs') or 1, clock.get('load_average_start'), clock.get('cpu_count')
    if jobs > 1:
        out.append(f'Training seconds (the seconds basis) were measured with {jobs} training runs sharing the '
                   f'machine, one per core: each ran slower than it would alone (memory bandwidth, caches), by a '
                   'different factor for the two arms. Read the seconds basis as this machine\'s, not a property of '
                   'the arms; the FLOP basis does not depend on it.')
    if load and cpus and load[0] > 0.5 * cpus:
        out.append(f'The machine was busy when the study started (load average {load[0]} on {cpus} CPUs): its '
                   'training seconds are pessimistic.')
    if results.get('missing_eval_tasks'):
        out.append(f"Core average computed without the missing eval tasks {results['missing_eval_tasks']}.")
    return out


def cost_report(results_path: str, inference_path: str, out_dir: str, **kwargs) -> dict[str, Any]:
    """Writes cost.json, cost.md and cost_breakeven.png into `out_dir` (all or none); returns the report.
    kwargs: see `build_cost` (top_k, tail_points, saturation_tol, throughput_metric)."""
    from .plots import plot_breakeven
    results = read_json(results_path, 'results')
    inference = read_json(inference_path, 'inference')
    cost = build_cost(results, inference, **kwargs)
    cost['inputs'] = {'results': str(results_path), 'inference': str(inference_path)}
    cost['files'] = atomic_write_files(out_dir, {
        'cost.md': lambda p: Path(p).write_text(render_cost_section(cost)),
        'cost_breakeven.png': lambda p: plot_breakeven(cost, p),
        'cost.json': lambda p: dump_json(cost, p),
    })
    return cost

