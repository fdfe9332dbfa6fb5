"""Benchmarks one served model with one engine. For vLLM this runs in a process of its own
(`python -m foundry_upcycle.bench.worker SPEC.json OUT.json`), one engine per process, so each model gets the
whole GPU and its memory is freed when the process exits."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from . import modes
from .outputs import jsonable
from .engines import HFEngine, VLLMEngine, resolve_device, run_async, vllm_engine_args
from .models import ServedModel, model_info, read_config

AUTO_RATE_FRACTIONS = (0.25, 0.5, 0.75, 1.0, 1.5)  # HF static online mode: of the first model's best offline rate


def auto_rates(first_model: dict[str, Any]) -> tuple[float, ...]:
    best = max(r['requests_per_s'] for r in first_model['offline'])
    return tuple(float(f'{f * best:.3g}') for f in AUTO_RATE_FRACTIONS)


def make_engine(kind: str, model: ServedModel, wl: modes.Workload, dtype: str, device: str):
    if kind == 'hf':
        import torch
        return HFEngine(model.path, getattr(torch, dtype), resolve_device(device))
    return VLLMEngine(vllm_engine_args(model.path, dtype, wl.scheduler_batch, wl.input_tokens + wl.output_tokens,
                                       wl.seed))


def bench_model(model: ServedModel, wl: modes.Workload, engine_kind: str, dtype: str, device: str,
                rates: Optional[Sequence[float]], progress: bool = False) -> dict[str, Any]:
    """Warm-up (excluded), the offline batch sizes, then the online rates (None: 'auto'), each `wl.repeats` times,
    every request with a fresh prompt."""
    from tqdm.auto import tqdm
    info = model_info(model)
    engine = make_engine(engine_kind, model, wl, dtype, device)
    prompts = modes.PromptStream(read_config(model.path)['vocab_size'], wl.input_tokens, wl.seed)
    try:
        engine.run_batch(prompts.take(min(wl.batch_sizes + (wl.scheduler_batch, 8))), wl.output_tokens)  # warm-up
        n_batches = sum(math.ceil(wl.num_requests / b) for b in wl.batch_sizes)
        with tqdm(total=wl.repeats * n_batches, desc=info['name'], unit='batch', disable=not progress) as bar:
            info['offline'] = [modes.repeated([modes.run_offline(engine, prompts, b, wl, bar)
                                               for _ in range(wl.repeats)]) for b in wl.batch_sizes]
        if engine_kind == 'vllm':
            info['online_mode'] = 'continuous batching (vLLM)'
            info['vllm_engine_args'] = {k: v for k, v in engine.engine_args.items() if k != 'model'}

            def measure(rate):
                return modes.repeated([run_async(modes.run_continuous(engine, prompts, rate, wl, wl.seed + i))
                                       for i in range(wl.repeats)])
        else:
            info['online_mode'] = 'static batching (HF generate fallback; not continuous batching)'
            if rates is None and wl.rates == 'auto':
                rates = auto_rates(info)

            def measure(rate):
                return modes.repeated([modes.run_online_static(engine, prompts, rate, wl)
                                       for _ in range(wl.repeats)])
        info['online'] = modes.rate_sweep(measure, wl, rates) if wl.rates else []
        info['prompts_sent'] = prompts.sent
    finally:
        engine.close()
    return {**info, **modes.max_throughput(info)}


def spec_of(model: ServedModel, wl: modes.Workload, engine_kind: str, dtype: str, device: str,
            rates: Optional[Sequence[float]]) -> dict[str, Any]:
    return {'model': dataclasses.asdict(model), 'workload': dataclasses.asdict(wl), 'engine': engine_kind,
            'dtype': dtype, 'device': device, 'rates': None if rates is None else list(rates)}


def from_spec(spec: dict[str, Any]) -> dict[str, Any]:
    wl = dict(spec['workload'])
    wl['batch_sizes'] = tuple(wl['batch_sizes'])
    wl['rates'] = wl['rates'] if wl['rates'] == 'auto' else tuple(wl['rates'])
    return bench_model(ServedModel(**spec['model']), modes.Workload(**wl), spec['engine'], spec['dtype'],
                       spec['device'], spec['rates'])


def run_isolated(spec: dict[str, Any], work: Path) -> dict[str, Any]:
    """bench_model in a fresh Python process; its result, or RuntimeError with the end of its stderr."""
    name = spec['model']['name']
    spec_path, out_path = work / f'{name}.spec.json', work / f'{name}.result.json'
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, '-m', 'foundry_upcycle.bench.worker', str(spec_path), str(out_path)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    if proc.returncode != 0 or not out_path.is_file():
        raise RuntimeError(f'benchmark of {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}')
    return json.loads(out_path.read_text())


def main(argv: Sequence[str]) -> int:
    spec_path, out_path = argv
    result = from_spec(json.loads(Path(spec_path).read_text()))
    Path(out_path).write_text(json.dumps(jsonable(result)))
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
