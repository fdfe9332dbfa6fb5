"""Strict JSON (no NaN / inf) and the benchmark's report files (written all-or-none by `atomic.atomic_write_files`)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from foundry_upcycle.atomic import atomic_write_files


def jsonable(x: Any) -> Any:
    """`x` with non-finite floats replaced by None and tuples by lists, so json.dumps emits strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


def dump_json(obj: Any, path: str) -> None:
    Path(path).write_text(json.dumps(jsonable(obj), indent=1, allow_nan=False) + '\n')


# Max throughput (input + output tokens/s) from the paper (vLLM 0.6.2, H100, 3500 in / 300 out); see REFERENCE.md.
# (dense name, dense tokens/s, MoE name, MoE top-1 tokens/s, MoE top-2 tokens/s)
PAPER_MAX_THROUGHPUT = (
    ('436M', 58140, '1.6B', 33820, 31920),
    ('1.4B', 46740, '6.7B', 31540, 25840),
    ('8B (4 GPUs, TP)', 32680, '47B', 19380, 16720),
)


def _fmt_params(n: int) -> str:
    for unit, div in (('B', 1e9), ('M', 1e6), ('K', 1e3)):
        if n >= div:
            return f'{n / div:.3g}{unit}'
    return str(n)


def _fmt_pct(x: Optional[float]) -> str:
    return '—' if x is None else f'{x:+.1f}%'


def _fmt_tps(x: float, std: Optional[float]) -> str:
    return f'{x:,.1f}' + (f' ± {std:,.1f}' if std else '')


def summary_rows(models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    dense = next((m for m in models if m['kind'] == 'dense'), None)
    rows = []
    for m in models:
        row = {k: m.get(k) for k in ('name', 'kind', 'top_k', 'total_params', 'active_params', 'max_total_tokens_per_s',
                                     'max_total_tokens_per_s_std', 'output_tokens_per_s_at_max',
                                     'max_output_tokens_per_s', 'max_at')}
        for metric in ('max_total_tokens_per_s', 'max_output_tokens_per_s'):
            row[f'{metric.removeprefix("max_").removesuffix("_tokens_per_s")}_change_vs_dense_pct'] = (
                100.0 * (m[metric] / dense[metric] - 1.0) if dense and dense[metric] > 0 else None)
        rows.append(row)
    return rows


def render_max_throughput(result: dict[str, Any]) -> str:
    """max_throughput.md: the measured table, then the paper's numbers in a separate, labelled table."""
    env, wl = result['environment'], result['workload']
    online = {m.get('online_mode') for m in result['models'] if m.get('online')}
    lines = [
        '# Max throughput: dense vs upcycled MoE',
        '',
        '## Measured here',
        '',
        f"Engine `{env['engine']}` (requested `{env['engine_requested']}`), device {env['device']} "
        f"({env['device_name']}), {env['threads']} threads, dtype {env['dtype']}, torch {env['torch']}, "
        f"transformers {env['transformers']}{', vLLM ' + env['vllm'] if env.get('vllm') else ''}. Workload: "
        f"{wl['input_tokens']} input / {wl['output_tokens']} output tokens per request (a fresh prompt each), "
        f"{wl['num_requests']} requests per setting, {wl['repeats']} repeat(s); batch sizes "
        f"{wl['batch_sizes'] or '—'}, request rates {wl['rates'] or '—'} req/s"
        f"{' (' + ', '.join(sorted(online)) + ')' if online else ''}. Throughput counts processed tokens "
        '(prompt + generated), as the paper reports it; output tokens/s beside it. Max over all settings '
        '(mean ± std over repeats); change relative to the dense model.',
        '',
        '| model | params (total / active) | max tokens/s (in + out) | change vs dense | output tokens/s there '
        '| max output tokens/s | change vs dense | best setting |',
        '|---|---|---|---|---|---|---|---|',
    ]
    for r in result['summary']:
        lines.append(
            f"| {r['name']} | {_fmt_params(r['total_params'])} / {_fmt_params(r['active_params'])} "
            f"| {_fmt_tps(r['max_total_tokens_per_s'], r['max_total_tokens_per_s_std'])} "
            f"| {_fmt_pct(r['total_change_vs_dense_pct'])} | {r['output_tokens_per_s_at_max']:,.1f} "
            f"| {r['max_output_tokens_per_s']:,.1f} | {_fmt_pct(r['output_change_vs_dense_pct'])} | {r['max_at']} |")
    lines += [
        '',
        '## Paper reference (not measured here)',
        '',
        'Doubov, Sardana, Chiley (2024), vLLM 0.6.2 on H100, Mistral vs Mixtral architectures, 3500 input / '
        '300 output tokens, request rate swept, 3 runs averaged. Max throughput in tokens/s.',
        '',
        '| dense | dense tokens/s | MoE | MoE top-1 tokens/s | MoE top-2 tokens/s |',
        '|---|---|---|---|---|',
    ]
    for dname, dense, mname, top1, top2 in PAPER_MAX_THROUGHPUT:
        lines.append(f'| {dname} | {dense:,} | {mname} | {top1:,} ({100 * (top1 / dense - 1):+.0f}%) '
                     f'| {top2:,} ({100 * (top2 / dense - 1):+.0f}%) |')
    return '\n'.join(lines) + '\n'


def write_outputs(result: dict[str, Any], out_dir: str) -> dict[str, str]:
    """Writes max_throughput.md, latency_vs_throughput.png and inference.json (last) into `out_dir`, all or none."""
    from .plots import plot_latency_vs_throughput
    return atomic_write_files(out_dir, {
        'max_throughput.md': lambda p: Path(p).write_text(render_max_throughput(result)),
        'latency_vs_throughput.png': lambda p: plot_latency_vs_throughput(result, p),
        'inference.json': lambda p: dump_json(result, p),
    })
