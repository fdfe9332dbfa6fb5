"""Inference stage: the largest-budget CPT model (dense) and upcycled model exported to Hugging Face folders (a real
base's runs saved theirs with foundry's hf_checkpointer) and benchmarked together (latency vs throughput), for the
cost report."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def export_and_benchmark(study, cpt, up, work: Path) -> dict[str, Any]:
    """The largest-budget CPT model (dense) and upcycled model as Hugging Face folders, benchmarked together."""
    import torch
    from foundry_upcycle.bench.inference import CPU_WORKLOAD, PAPER_WORKLOAD, BenchConfig, Workload, benchmark
    from foundry_upcycle.checkpoint_io import load_state_dict
    from foundry_upcycle.export.hf_export import export_state_dict
    inf, tokenizer = study.cfg.inference, study._data_paths()['tokenizer']
    paths = {}
    for name, stage in (('dense', cpt), ('moe', up)):
        if stage.outputs.get('hf'):           # a real base's run: foundry's hf_checkpointer saved it already
            paths[name] = stage.dir / stage.outputs['hf']
            continue
        sd = load_state_dict(study._checkpoint(stage), f'{stage.name} checkpoint')
        paths[name] = export_state_dict(sd, stage.outputs['model'], work / 'hf' / name, tokenizer=tokenizer,
                                        progress=False)
        del sd
    top_k = int(study.plan.upcycle_block.get('top_k', 2))
    top_ks = inf.top_ks or tuple(sorted({1, top_k}))
    gpu = torch.cuda.is_available()
    default_in, default_out = PAPER_WORKLOAD if gpu else CPU_WORKLOAD
    if default_in + default_out > study.plan.seq_len:     # the exported models hold max_seq_len positions
        default_in, default_out = study.plan.seq_len // 2, study.plan.seq_len // 4
    workload = Workload(input_tokens=inf.input_tokens or default_in, output_tokens=inf.output_tokens or default_out,
                        num_requests=inf.num_requests or (64 if gpu else 8),
                        batch_sizes=inf.batch_sizes or ((1, 4, 16, 64) if gpu else (1, 4)), rates=(),
                        seed=study.cfg.seed)
    bench_cfg = BenchConfig(workload=workload, dense_path=str(paths['dense']), moe_path=str(paths['moe']),
                            top_ks=top_ks, threads=study.cfg.threads, progress=study.cfg.progress)
    result = benchmark(bench_cfg, str(work))
    files = {k: Path(v).name for k, v in result['files'].items()}
    return {'inference_json': files['inference.json'], 'figure': files['latency_vs_throughput.png'],
            'hf': {k: str(Path(v).relative_to(work)) if Path(v).is_relative_to(work) else str(v)
                   for k, v in paths.items()},
            'summary': result.get('summary')}


def cost_section(results_path: Path, inference, out: Path) -> str:
    """Runs the cost report on results.json and the inference stage's benchmark; returns its markdown section (or a
    sentence saying why there is none)."""
    import logging
    from foundry_upcycle.bench.cost import cost_report, render_cost_section
    inference_json = inference.dir / inference.outputs['inference_json']
    try:
        cost = cost_report(str(results_path), str(inference_json), str(out))
    except ValueError as e:
        logging.getLogger(__name__).warning('cost report not written: %s', e)
        return f'## Inference cost\n\nThe cost report could not be computed: {e}\n'
    text = render_cost_section(cost)
    figures = [f'![Latency vs throughput](inference/{inference.outputs["figure"]})',
               '![Break-even](cost/cost_breakeven.png)']
    return (text.rstrip('\n') + '\n\n' + '\n\n'.join(figures) + '\n\nMeasured throughput table: '
            '[inference/max_throughput.md](inference/max_throughput.md); cost details: cost/cost.json.\n')
