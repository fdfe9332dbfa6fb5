"""The cost report's inputs: the study's results.json (schemas 1-3) and the benchmark's inference.json, checked field
by field (a ValueError names the missing or mistyped field), and read into one shape."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

RESULTS_SCHEMAS = (1, 2, 3)
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


def read_json(path: str, what: str) -> dict[str, Any]:
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
ARM_FIELDS[3] = ARM_FIELDS[2]


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
        _field(arm, 'arm', at, str)
        for key in ARM_FIELDS[schema]:
            _field(arm, key, at)
        _field(arm, 'eval.core_average', at, nullable=True)
        if schema >= 2:
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
        fpt = arm.get('flops_per_token') or arm['train_flops'] / tokens
        out.append({**arm, 'tokens': tokens, 'flops_per_token': fpt,
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

