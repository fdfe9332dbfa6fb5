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
results.json schema 1 (per-arm `tokens`, `flops_per_token`, `steps`, `step_time_s`) and schema 2 (per-arm means over
seeds with `n_seeds`, `eval_std`, `eval_sem`, `per_seed`, `train_tokens`, `train_seconds`) are both read.

Pure Python (plus Matplotlib for the figure). Entry points: `cost_report`, `build_cost`, `render_cost_section`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from foundry_upcycle.atomic import atomic_write_files

from .outputs import dump_json

SCHEMA = 2
RESULTS_SCHEMAS = (1, 2)
BASES = ('seconds', 'flops', 'throughput')
METRICS = {'ce_domain': 'lower', 'core_average': 'higher'}  # quality metric -> which direction is better
PRIMARY_METRIC = 'ce_domain'
THROUGHPUT_METRICS = ('total_tokens_per_s', 'output_tokens_per_s')
FAR_EXTRAPOLATION = 10.0  # beyond this multiple of the largest CPT compute, an extrapolation is flagged

_NUMBER = (int, float)


# ------------------------------------------------------------------------------------------ validation

def _field(obj: Any, path: str, where: str, kinds=_NUMBER, nullable: bool = False) -> Any:
    """obj[path] for a dotted path, or ValueError naming the missing / mistyped field."""
    cur = obj
    walked = []
    for part in path.split('.'):
        walked.append(part)
        if not isinstance(cur, dict) or part not in cur:
            raise ValueError(f"{where}: field '{'.'.join(walked)}' is missing")
        cur = cur[part]
    if cur is None and nullable:
        return None
    if isinstance(cur, bool) or not isinstance(cur, kinds):
        raise ValueError(f"{where}: field '{path}' must be {_kind_name(kinds)}, got {cur!r}")
    return cur


def _kind_name(kinds) -> str:
    return 'a number' if kinds == _NUMBER else ' or '.join(k.__name__ for k in (kinds if isinstance(kinds, tuple)
                                                                               else (kinds,)))


def _read_json(path: str, what: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f'--{what}: {path} does not exist or is not a file')
    try:
        obj = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f'--{what}: {path} is not valid JSON ({e})') from None
    if not isinstance(obj, dict):
        raise ValueError(f'--{what}: {path} must hold a JSON object')
    return obj


ARM_FIELDS = {1: ('budget', 'tokens', 'train_flops', 'flops_per_token', 'eval.ce_domain'),
              2: ('budget', 'train_tokens', 'train_flops', 'eval.ce_domain')}


def validate_results(results: dict[str, Any], where: str = 'results.json') -> None:
    """Checks the fields the cost report reads (the study's results.json, schema 1 or 2)."""
    schema = _field(results, 'schema', where, int)
    if schema not in RESULTS_SCHEMAS:
        raise ValueError(f"{where}: field 'schema' is {schema}, this report reads schemas {RESULTS_SCHEMAS}")
    _field(results, 'budgets', where, list)
    for key in ('params', 'flops_per_token', 'pretrain_flops', 'eval.ce_domain'):
        _field(results, f'dense.{key}', where)
    _field(results, 'dense.eval.core_average', where, nullable=True)
    for i, arm in enumerate(_field(results, 'arms', where, list)):
        at = f'{where}: arms[{i}]'
        if _field(arm, 'arm', at, str) not in ('cpt', 'upcycle'):
            raise ValueError(f"{at}: field 'arm' must be 'cpt' or 'upcycle', got {arm['arm']!r}")
        for key in ARM_FIELDS[schema]:
            _field(arm, key, at)
        _field(arm, 'eval.core_average', at, nullable=True)
        if schema == 2:
            _field(arm, 'n_seeds', at, int)
            _field(arm, 'train_seconds', at, nullable=True)
    for b in results['budgets']:
        for kind in ('cpt', 'upcycle'):
            if not any(a['arm'] == kind and math.isclose(a['budget'], b) for a in results['arms']):
                raise ValueError(f"{where}: budget {b} has no '{kind}' arm in 'arms'")


def _train_seconds(arm: dict[str, Any]) -> Optional[float]:
    if 'train_seconds' in arm:
        return arm['train_seconds']
    steps, step = arm.get('steps'), arm.get('step_time_s')  # schema 1: median step time x steps
    return steps * step if isinstance(steps, _NUMBER) and isinstance(step, _NUMBER) else None


def normalized_arms(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Arms in one shape whatever the schema: tokens, flops_per_token, train_seconds (or None), eval, eval_sem."""
    out = []
    for arm in results['arms']:
        tokens = arm['tokens'] if 'tokens' in arm else arm['train_tokens']
        out.append({**arm, 'tokens': tokens, 'flops_per_token': arm.get('flops_per_token') or arm['train_flops'] / tokens,
                    'train_seconds': _train_seconds(arm), 'eval_sem': arm.get('eval_sem') or {},
                    'n_seeds': arm.get('n_seeds', 1)})
    return out


def validate_inference(inference: dict[str, Any], where: str = 'inference.json') -> None:
    for key in ('environment.engine', 'environment.device', 'workload.input_tokens', 'workload.output_tokens'):
        _field(inference, key, where, (str, int))
    models = _field(inference, 'models', where, list)
    for i, m in enumerate(models):
        at = f'{where}: models[{i}]'
        _field(m, 'name', at, str)
        _field(m, 'kind', at, str)
        _field(m, 'top_k', at, int, nullable=True)
        for key in ('total_params', 'active_params', 'max_output_tokens_per_s', 'max_total_tokens_per_s'):
            _field(m, key, at)
    if not any(m['kind'] == 'dense' for m in models):
        raise ValueError(f'{where}: no model with kind "dense" in models: the extra cost needs the dense baseline')


# ------------------------------------------------------------------------------------------- the curve

def match_compute(flops: Sequence[float], loss: Sequence[float], start: int, target: float, tail_points: int,
                  saturation_tol: float) -> dict[str, Any]:
    """Training compute at which the CPT curve (sorted by compute; lower loss is better) first reaches `target`,
    searching from point `start` (the CPT run at the upcycled model's budget) onwards.

    status: 'not_needed' (CPT at `start` is already as good), 'interpolated' (piecewise-linear in log compute),
    'extrapolated' (past the last point along a least-squares line over the last `tail_points` points),
    'never' (that line improves by less than `saturation_tol` per doubling of compute: CPT has saturated),
    'unknown' (a single CPT point, nothing to extrapolate from).
    """
    out: dict[str, Any] = {'cpt_train_flops_needed': None, 'extrapolation_factor': None,
                           'improvement_per_doubling': None}
    if loss[start] <= target:
        return {**out, 'status': 'not_needed', 'cpt_train_flops_needed': flops[start],
                'note': 'CPT at the same budget is already as good'}
    for i in range(start, len(flops) - 1):
        if loss[i + 1] <= target:
            frac = (loss[i] - target) / (loss[i] - loss[i + 1])
            log_c = math.log(flops[i]) + frac * (math.log(flops[i + 1]) - math.log(flops[i]))
            return {**out, 'status': 'interpolated', 'cpt_train_flops_needed': math.exp(log_c),
                    'note': f'interpolated between CPT runs at {flops[i]:.3g} and {flops[i + 1]:.3g} FLOPs'}
    n = min(max(tail_points, 2), len(flops))
    if n < 2:
        return {**out, 'status': 'unknown', 'note': 'a single CPT budget: cannot extrapolate the CPT curve'}
    xs = [math.log2(c) for c in flops[-n:]]
    slope = _slope(xs, loss[-n:])
    gain = round(-slope, 12) + 0.0  # no '-0' for a flat line
    out['improvement_per_doubling'] = gain
    if gain < saturation_tol:
        return {**out, 'status': 'never',
                'note': f'CPT has saturated: over its last {n} budgets it improves by {gain:.3g} per doubling of '
                        f'compute (< {saturation_tol:g}), short of the upcycled quality'}
    doublings = (loss[-1] - target) / gain
    factor = 2.0 ** doublings
    note = f'extrapolated {factor:.3g}x past the largest CPT run along the fit over its last {n} budgets'
    if factor > FAR_EXTRAPOLATION:
        note += f' (more than {FAR_EXTRAPOLATION:g}x: unreliable)'
    return {**out, 'status': 'extrapolated', 'cpt_train_flops_needed': flops[-1] * factor,
            'extrapolation_factor': factor, 'note': note}


def _slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var > 0 else 0.0


# ------------------------------------------------------------------------------------------ the report

def _arm(results: dict[str, Any], kind: str, budget: float) -> dict[str, Any]:
    return next(a for a in results['arms'] if a['arm'] == kind and math.isclose(a['budget'], budget))


def _sign(metric: str) -> float:
    return 1.0 if METRICS[metric] == 'lower' else -1.0  # loss = sign * value (lower is better)


def cpt_curve(results: dict[str, Any], metric: str) -> dict[str, list]:
    arms = sorted((a for a in results['arms'] if a['arm'] == 'cpt' and a['eval'][metric] is not None),
                  key=lambda a: a['train_flops'])
    return {'budgets': [a['budget'] for a in arms], 'train_flops': [a['train_flops'] for a in arms],
            'train_seconds': [a['train_seconds'] for a in arms], 'values': [a['eval'][metric] for a in arms]}


def study_top_k(results: dict[str, Any], inference: dict[str, Any]) -> tuple[int, Optional[str]]:
    """The study's top_k (from its config), else the only MoE top_k benchmarked, else 2; plus a note if guessed."""
    found = training_top_k(results)
    if found is not None:
        return found, None
    ks = sorted({m['top_k'] for m in inference['models'] if m['kind'] == 'moe'})
    if len(ks) == 1:
        return ks[0], f'the study config names no top_k; using the only benchmarked one, top-{ks[0]}'
    return 2, 'the study config names no top_k; assuming top-2 (the paper\'s)'


def training_top_k(results: dict[str, Any]) -> Optional[int]:
    cfg = results.get('config') or {}
    for found in ((cfg.get('upcycle') or {}).get('top_k'), cfg.get('top_k'), cfg.get('moe_top_k')):
        if isinstance(found, int) and not isinstance(found, bool):
            return found
    return None


def measured_cost(inference: dict[str, Any], top_k: int, metric: str) -> dict[str, Any]:
    key = f'max_{metric}'
    dense = next(m for m in inference['models'] if m['kind'] == 'dense')
    moe = next((m for m in inference['models'] if m['kind'] == 'moe' and m['top_k'] == top_k), None)
    if moe is None:
        have = [m['name'] for m in inference['models']]
        raise ValueError(f'inference.json: no MoE model with top_k={top_k} (models: {have}); '
                         f'benchmark it with --top-k {top_k} or pass the study\'s top_k')
    ratio = dense[key] / moe[key]
    return {'metric': metric, 'dense_model': dense['name'], 'moe_model': moe['name'],
            'dense_tokens_per_s': dense[key], 'moe_tokens_per_s': moe[key], 'throughput_ratio': ratio,
            'extra_cost': ratio - 1.0, 'dense_seconds_per_token': 1.0 / dense[key],
            'moe_seconds_per_token': 1.0 / moe[key], 'extra_seconds_per_token': 1.0 / moe[key] - 1.0 / dense[key],
            'dense_params': dense['total_params'], 'moe_total_params': moe['total_params'],
            'moe_active_params': moe['active_params']}


def _verdicts(out: dict[str, Any], basis: str, status: str, extra: Optional[float], delta: float,
              train_tokens: float) -> None:
    tokens, verdict = _tokens_and_verdict(status, extra, delta)
    out[f'tokens_{basis}'] = tokens
    out[f'tokens_{basis}_per_training_token'] = None if tokens is None else tokens / train_tokens
    out[f'verdict_{basis}'] = verdict


def _break_even(match: dict[str, Any], c_budget: float, df: dict[str, float], train_tokens: float) -> dict[str, Any]:
    out = dict(match)
    needed = match['cpt_train_flops_needed']
    extra = None if needed is None else max(needed - c_budget, 0.0)
    out.update(extra_train_flops=extra, extra_train_flops_ratio=None if extra is None else extra / c_budget)
    for basis, delta in df.items():
        _verdicts(out, basis, match['status'], extra, delta, train_tokens)
    return out


def _seconds_break_even(out: dict[str, Any], curve: dict[str, list], start: int, losses: list[float], target: float,
                        up_seconds: Optional[float], extra_per_token: float, train_tokens: float,
                        tail_points: int, saturation_tol: float) -> None:
    """The seconds basis, into `out`: CPT training seconds to reach `target`, minus the upcycled run's seconds,
    over the extra serving seconds per processed token."""
    seconds = curve['train_seconds']
    if up_seconds is None or any(t is None for t in seconds):
        out.update(seconds_status='missing', tokens_seconds=None, tokens_seconds_per_training_token=None,
                   extra_train_seconds=None, cpt_train_seconds_needed=None,
                   verdict_seconds='no seconds basis (train_seconds missing from results.json)')
        return
    match = match_compute(seconds, losses, start, target, tail_points, saturation_tol)
    needed = match['cpt_train_flops_needed']  # in seconds here
    extra = None if needed is None else max(needed - up_seconds, 0.0)
    out.update(seconds_status=match['status'], cpt_train_seconds_needed=needed, extra_train_seconds=extra,
               upcycle_train_seconds=up_seconds)
    if match['status'] == 'not_needed' and extra:
        match['status'] = 'interpolated'  # CPT is as good but took longer to train: demand decides
    _verdicts(out, 'seconds', match['status'], extra, extra_per_token, train_tokens)


def _tokens_and_verdict(status: str, extra: Optional[float], delta: float) -> tuple[Optional[float], str]:
    if status == 'not_needed':
        return 0.0, 'dense CPT cheaper at any demand (already as good)'
    if status == 'never':
        return None, 'never (CPT saturates short of the upcycled quality)'
    if status == 'unknown':
        return None, 'unknown (one CPT budget)'
    if delta <= 0:
        return None, 'never (the MoE costs no more per token)'
    tokens = extra / delta
    return tokens, f'dense CPT cheaper beyond {tokens:.3g} tokens processed'


def _gains(cpt: dict[str, Any], up: dict[str, Any]) -> dict[str, Any]:
    """Gain of upcycling per metric, its standard error (schema 2, from the seeds) and whether it is a tie
    (|gain| < 2 standard errors)."""
    out: dict[str, Any] = {}
    for metric in METRICS:
        a, b = cpt['eval'][metric], up['eval'][metric]
        gain = None if a is None or b is None else _sign(metric) * (a - b)
        sems = [arm['eval_sem'].get(metric) for arm in (cpt, up)]
        sem = math.hypot(*sems) if gain is not None and all(isinstance(x, _NUMBER) for x in sems) else None
        out[f'{metric}_gain'] = gain
        out[f'{metric}_gain_sem'] = sem
        out[f'{metric}_tie'] = None if sem is None else abs(gain) < 2 * sem
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
    gains = _gains(cpt, up)
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
        be = _break_even(match, cpt['train_flops'], df, cpt['tokens'])
        _seconds_break_even(be, curve, start, losses, target, up['train_seconds'],
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
    if results.get('missing_eval_tasks'):
        out.append(f"Core average computed without the missing eval tasks {results['missing_eval_tasks']}.")
    return out


def cost_report(results_path: str, inference_path: str, out_dir: str, **kwargs) -> dict[str, Any]:
    """Writes cost.json, cost.md and cost_breakeven.png into `out_dir` (all or none); returns the report.
    kwargs: see `build_cost` (top_k, tail_points, saturation_tol, throughput_metric)."""
    from .plots import plot_breakeven
    results = _read_json(results_path, 'results')
    inference = _read_json(inference_path, 'inference')
    cost = build_cost(results, inference, **kwargs)
    cost['inputs'] = {'results': str(results_path), 'inference': str(inference_path)}
    cost['files'] = atomic_write_files(out_dir, {
        'cost.md': lambda p: Path(p).write_text(render_cost_section(cost)),
        'cost_breakeven.png': lambda p: plot_breakeven(cost, p),
        'cost.json': lambda p: dump_json(cost, p),
    })
    return cost


# ------------------------------------------------------------------------------------------- markdown

def _g(x: Optional[float], fmt: str = '.3g') -> str:
    return '—' if x is None else format(x, fmt)


def _tokens(be: Optional[dict[str, Any]], basis: str, ratio: bool = True) -> str:
    if be is None:
        return '—'
    t = be[f'tokens_{basis}']
    if t is None:
        return be[f'verdict_{basis}'].split(' (')[0]
    if t == 0:
        return '0 (CPT as good)'
    return f"{t:.3g} ({be[f'tokens_{basis}_per_training_token']:.3g}x)" if ratio else f'{t:.3g}'


def _status(be: dict[str, Any]) -> str:
    factor = be.get('extrapolation_factor')
    if be['status'] == 'extrapolated' and factor and factor > FAR_EXTRAPOLATION:
        return f'extrapolated {factor:.3g}x past the data, unreliable'
    return be['status']


def _match(be: Optional[dict[str, Any]]) -> str:
    if be is None:
        return '—'
    if be['extra_train_flops'] is None:
        return be['status']
    return f"+{be['extra_train_flops']:.3g} FLOPs (+{100 * be['extra_train_flops_ratio']:.0f}%), {_status(be)}"


def _gain_text(row: dict[str, Any], metric: str) -> str:
    sem = row.get(f'{metric}_gain_sem')
    text = f'{row[f"{metric}_gain"]:.3g}' + (f' ± {sem:.2g} (s.e.)' if sem is not None else '')
    return text + (' — inside the noise: a tie' if row.get(f'{metric}_tie') else '')


def _decision(row: dict[str, Any], metric: str) -> str:
    be = row['break_even'][metric]
    b = f"{row['budget']:g}x"
    if be is None:
        return f'- {b}: no {metric} for both arms.'
    if be['status'] == 'not_needed':
        return f'- {b}: CPT is already as good on {metric}; the dense CPT model is cheaper at any demand.'
    if be['status'] == 'never':
        return (f'- {b}: upcycling wins by {_gain_text(row, metric)} on {metric} and CPT cannot catch up '
                f'({be["note"]}); the extra inference cost is the price of that quality.')
    if be['status'] == 'unknown':
        return f'- {b}: upcycling wins by {_gain_text(row, metric)} on {metric}; {be["note"]}.'
    return (f'- {b}: upcycling wins by {_gain_text(row, metric)} on {metric}. CPT matches it with {_match(be)}; '
            f'so beyond {_tokens(be, "seconds", False)} tokens processed (measured seconds; '
            f'{_tokens(be, "flops", False)} by FLOPs) the longer-trained dense model is cheaper, below that '
            'the upcycled one.')


def render_cost_section(cost: dict[str, Any]) -> str:
    """The report section (markdown) the study's report includes verbatim."""
    inf, metric = cost['inference'], cost['primary_metric']
    wl = inf['workload']
    lines = [
        '## Inference cost: upcycling vs continued pretraining',
        '',
        f"The upcycled MoE (top-{cost['top_k']}) processes {inf['moe_tokens_per_s']:,.1f} vs the dense model's "
        f"{inf['dense_tokens_per_s']:,.1f} {inf['metric'].replace('_per_s', '').replace('_', ' ')}/s "
        f"(engine {inf['engine']}, {inf['device']}, {wl['input_tokens']} in / {wl['output_tokens']} out; tokens "
        f"processed = prompt + generated): {100 * inf['extra_cost']:+.1f}% time per token, measured "
        f"({inf['extra_seconds_per_token']:.3g} s more per token). By FLOPs: "
        f"{100 * cost['budgets'][0]['extra_cost_per_token']['flops']:+.1f}%.",
        '',
        f'**Decision** (quality metric: {metric}; break-even = lifetime tokens processed beyond which the dense '
        'CPT model, trained longer to the same quality, is cheaper overall; three bases, see Assumptions):',
        '',
        *[_decision(row, metric) for row in cost['budgets']],
        '',
        '| budget | domain CE: CPT → upcycled (gain) | core avg: CPT → upcycled (gain) '
        '| CE gain per +10% cost (measured / FLOPs) | extra CPT compute to match CE '
        '| break-even tokens, seconds (x CPT train tokens) | break-even, FLOPs | break-even, throughput in FLOPs |',
        '|---|---|---|---|---|---|---|---|',
    ]
    for row in cost['budgets']:
        per = row['quality_per_extra_cost']
        be = row['break_even'][metric]
        lines.append(
            f"| {row['budget']:g}x | {row['cpt']['ce_domain']:.4g} → {row['upcycle']['ce_domain']:.4g} "
            f"({_g(row['ce_domain_gain'], '+.3g')}) "
            f"| {_g(row['cpt']['core_average'], '.4g')} → {_g(row['upcycle']['core_average'], '.4g')} "
            f"({_g(row['core_average_gain'], '+.3g')}) "
            f"| {_g(_tenth(per['seconds']['ce_domain']))} / {_g(_tenth(per['flops']['ce_domain']))} "
            f"| {_match(be)} | {_tokens(be, 'seconds')} | {_tokens(be, 'flops')} | {_tokens(be, 'throughput')} |")
    if any(row['break_even'].get('core_average') for row in cost['budgets']):
        lines += ['', 'Same break-even on the core average:', '',
                  '| budget | extra CPT compute to match | break-even tokens, seconds | break-even tokens, FLOPs |',
                  '|---|---|---|---|']
        for row in cost['budgets']:
            be = row['break_even'].get('core_average')
            lines.append(f"| {row['budget']:g}x | {_match(be)} | {_tokens(be, 'seconds')} "
                         f"| {_tokens(be, 'flops')} |")
    else:
        lines += ['', 'No core average for both arms: no break-even on it.']
    lines += ['', '### Assumptions', '', *[f'- {a}' for a in cost['assumptions']]]
    if cost['warnings']:
        lines += ['', '### Caveats', '', *[f'- {w}' for w in cost['warnings']]]
    return '\n'.join(lines) + '\n'


def _tenth(x: Optional[float]) -> Optional[float]:
    return None if x is None else x / 10.0
