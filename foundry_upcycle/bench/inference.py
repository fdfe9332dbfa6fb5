"""Latency vs throughput of a dense model and its upcycled MoE at top-1 and top-2 (the paper's Figures 2 and 3).

The benchmark reads as four modules: `models` (what is served: HF directories, synthetic ones from a shape,
one directory per top-k), `engines` (vLLM's async engine, continuous batching, one per process; or HF
`generate`, static batches, the CPU fallback), `modes` (offline batches; Poisson request-rate sweeps with
continuous batching on vLLM, static batching on HF; what is measured), `outputs` (inference.json, the table,
the figure). This module holds the configuration and runs the models in order: with vLLM each in its own
process (`worker.run_isolated`), with HF in this one.
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from foundry_upcycle.export.targets import DTYPE_NAMES
from foundry_upcycle.shapes import SHAPES, ModelShape

from . import models as M
from .engines import ENGINES, resolve_device, resolve_dtype, resolve_engine
from .modes import CPU_WORKLOAD, PAPER_WORKLOAD, Workload, paper_workload  # noqa: F401  (re-exported)
from .outputs import summary_rows, write_outputs
from .worker import bench_model, run_isolated, spec_of

log = logging.getLogger(__name__)

SCHEMA = 2


def _positive_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


@dataclass(frozen=True)
class BenchConfig:
    workload: Workload = Workload()
    shape: ModelShape = SHAPES['tiny']
    dense_path: Optional[str] = None  # HF directory; with moe_path None too, synthetic models from `shape`
    moe_path: Optional[str] = None
    top_ks: tuple[int, ...] = (1, 2)
    engine: str = 'auto'
    device: str = 'auto'
    dtype: str = 'auto'
    threads: Optional[int] = None
    router_init_std: float = 0.02
    progress: bool = True

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ValueError(f'engine must be one of {ENGINES}, got {self.engine!r}')
        if self.device not in ('auto', 'cpu', 'cuda'):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.dtype != 'auto' and self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPE_NAMES)}, got {self.dtype!r}")
        if not self.top_ks or not all(_positive_int(k) for k in self.top_ks):
            raise ValueError(f'top_ks must be positive integers, got {self.top_ks!r}')
        if self.synthetic and max(self.top_ks) > self.shape.num_experts:
            raise ValueError(f'top_ks {self.top_ks} exceed shape.num_experts={self.shape.num_experts}')
        if self.threads is not None and not _positive_int(self.threads):
            raise ValueError(f'threads must be a positive integer, got {self.threads!r}')
        for key in ('dense_path', 'moe_path'):
            path = getattr(self, key)
            if path is not None and not (Path(path) / 'config.json').is_file():
                raise ValueError(f'{key}: {path} is not a Hugging Face model directory (no config.json)')

    @property
    def synthetic(self) -> bool:
        return self.dense_path is None and self.moe_path is None


def check_memory(cfg: BenchConfig, dtype: str, device) -> None:
    """Refuses synthetic shapes that cannot fit: the MoE's weights + KV cache of the largest batch."""
    s, wl = cfg.shape, cfg.workload
    width = 4 if dtype == 'float32' else 2
    batch = max(wl.batch_sizes + (wl.scheduler_batch,))
    kv = 2 * s.n_layers * s.n_kv_heads * (s.d_model // s.n_heads) * (wl.input_tokens + wl.output_tokens) * batch
    need = s.params(moe=True) * width + kv * width
    if device.type == 'cuda':
        import torch
        avail = torch.cuda.mem_get_info()[0]
    else:
        try:
            import psutil
            avail = psutil.virtual_memory().available
        except ImportError:
            return
    if need > 0.9 * avail:
        raise ValueError(
            f'shape {s} with {wl.input_tokens + wl.output_tokens} tokens x batch {batch} needs about '
            f'{need / 2**30:.1f} GiB on {device.type}, {avail / 2**30:.1f} GiB available: use --dtype bfloat16, a '
            'smaller --shape, or smaller --batch-sizes / --input-tokens')


def _shape_name(shape: ModelShape) -> str:
    return next((n for n, s in SHAPES.items() if s == shape), 'custom')


def environment(device, engine: str, requested: str, dtype: str, threads: int) -> dict[str, Any]:
    import torch
    import transformers
    env = {
        'device': device.type, 'device_name': _device_name(device), 'torch': torch.__version__,
        'transformers': transformers.__version__, 'python': platform.python_version(),
        'platform': platform.platform(), 'threads': threads, 'cpu_count': os.cpu_count(), 'engine': engine,
        'engine_requested': requested, 'dtype': dtype, 'load_average': os.getloadavg()[0],
    }
    if engine == 'vllm':
        import vllm
        env['vllm'] = vllm.__version__
    return env


def _device_name(device) -> str:
    if device.type == 'cuda':
        import torch
        return torch.cuda.get_device_name(device)
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'cpu'


def run_benchmark(cfg: BenchConfig) -> dict[str, Any]:
    """Runs every model through the offline and online modes; returns the inference.json content."""
    import torch
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run_benchmark(cfg, torch.get_num_threads())
    finally:
        torch.set_num_threads(threads)


def _run_benchmark(cfg: BenchConfig, threads: int) -> dict[str, Any]:
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    engine = resolve_engine(cfg.engine, device)
    wl = cfg.workload
    if cfg.synthetic:
        check_memory(cfg, dtype, device)
    rates: Optional[tuple[float, ...]] = None if wl.rates == 'auto' else tuple(wl.rates)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix='bench-models-') as tmp:
        work = Path(tmp)
        dense, moe = cfg.dense_path, cfg.moe_path
        source = {'dense': dense or '', 'moe': moe or ''}
        if cfg.synthetic:
            dense, moe = M.synthetic_dirs(cfg.shape, wl.input_tokens + wl.output_tokens, wl.seed,
                                          cfg.router_init_std, dtype, work)
            source = dict.fromkeys(('dense', 'moe'), f'synthetic:{_shape_name(cfg.shape)}')
        for model in M.served_models(dense, moe, cfg.top_ks, source, work):
            if engine == 'vllm':
                results.append(run_isolated(spec_of(model, wl, engine, dtype, cfg.device, rates), work))
            else:
                results.append(bench_model(model, wl, engine, dtype, cfg.device, rates, cfg.progress))
                if wl.rates == 'auto':  # HF: every model gets the first one's rates
                    rates = tuple(r['rate'] for r in results[0]['online'])
    return {
        'schema': SCHEMA,
        'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        'environment': environment(device, engine, cfg.engine, dtype, threads),
        'workload': {**dataclasses.asdict(wl), 'rates': sorted({r['rate'] for m in results for r in m['online']}),
                     'rates_requested': wl.rates, 'scheduler_batch': wl.scheduler_batch},
        'shape': dataclasses.asdict(cfg.shape) if cfg.synthetic else None,
        'models': results,
        'summary': summary_rows(results),
    }


def benchmark(cfg: BenchConfig, out_dir: str) -> dict[str, Any]:
    """run_benchmark + write_outputs; returns the result (with the written paths under 'files')."""
    result = run_benchmark(cfg)
    result['files'] = write_outputs(result, out_dir)
    return result
