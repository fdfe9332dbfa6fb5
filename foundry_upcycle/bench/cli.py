"""`foundry-upcycle bench-inference` and `foundry-upcycle cost`. Imports only stdlib at module level."""
from __future__ import annotations

import logging
from pathlib import Path

SHAPE_FLAGS = {  # flag -> ModelShape field
    'd_model': 'd_model', 'layers': 'n_layers', 'ffn': 'ffn_hidden', 'heads': 'n_heads',
    'kv_heads': 'n_kv_heads', 'vocab': 'vocab_size', 'experts': 'num_experts',
}


def register(subparsers) -> None:
    _register_bench(subparsers)
    _register_cost(subparsers)


def _register_bench(subparsers) -> None:
    p = subparsers.add_parser(
        'bench-inference', help='latency vs throughput: dense vs upcycled MoE at top-1 / top-2',
        description='Benchmarks a dense model and its MoE (HF directories, or synthetic Llama/Mixtral models from '
                    'a shape) over batch sizes (offline) and Poisson request rates (online). Writes inference.json, '
                    'latency_vs_throughput.png and max_throughput.md into --out.')
    p.add_argument('--dense', metavar='HF_DIR', help='dense Llama/Mistral Hugging Face directory')
    p.add_argument('--moe', metavar='HF_DIR', help='Mixtral (or DBRX) Hugging Face directory')
    p.add_argument('--shape', default='tiny', help='synthetic shape when no --dense/--moe: tiny, 436m, 1.4b '
                   '(default tiny); the flags below override single fields')
    for flag in SHAPE_FLAGS:
        p.add_argument(f"--{flag.replace('_', '-')}", type=int, dest=f'shape_{flag}')
    p.add_argument('--top-k', default='1,2', help='MoE top-k values to benchmark (default 1,2)')
    p.add_argument('--input-tokens', type=int, help='prompt tokens per request (default 64 on CPU, 3500 on GPU)')
    p.add_argument('--output-tokens', type=int, help='generated tokens per request (default 16 on CPU, 300 on GPU)')
    p.add_argument('--num-requests', type=int, help='requests per setting (default 16 on CPU, 64 on GPU)')
    p.add_argument('--batch-sizes', help='offline batch sizes, comma-separated (default 1,2,4,8 on CPU, '
                   '1,4,16,64 on GPU); empty for none')
    p.add_argument('--rates', default=None, help="online request rates (req/s), comma-separated; 'auto' "
                   '(default): on vLLM a doubling sweep from --start-rate to saturation, on HF fractions of the dense model\'s best offline rate; empty for no online mode')
    p.add_argument('--workload', choices=('default', 'paper'), default='default',
                   help="paper: the paper's 3500 in / 300 out, a Poisson rate sweep to saturation, 3 repeats (the "
                        'flags below override single fields)')
    p.add_argument('--start-rate', type=float, help="first rate of the 'auto' sweep on vLLM (doubles until "
                   'throughput stops growing; default 1, paper workload 2)')
    p.add_argument('--max-batch-size', type=int, help='engine concurrency limit: vLLM max_num_seqs, HF online batch '
                   '(default: largest batch size)')
    p.add_argument('--online-max-seconds', type=float,
                   help='time bound per online rate; nothing is submitted after it (default 30)')
    p.add_argument('--drain-seconds', type=float, help='after the bound, unfinished requests get this long, then '
                   'are cancelled and counted as unfinished (default: --online-max-seconds)')
    p.add_argument('--repeats', type=int,
                   help='runs per setting; means (and std) of throughput are reported (default 1 on CPU, 3 on GPU)')
    p.add_argument('--engine', choices=('auto', 'hf', 'vllm'), default='auto',
                   help='auto: vLLM when importable with a GPU, else HF generate')
    p.add_argument('--device', choices=('auto', 'cpu', 'cuda'), default='auto')
    p.add_argument('--dtype', choices=('auto', 'float32', 'bfloat16', 'float16'), default='auto',
                   help='auto: float32 on CPU, bfloat16 on GPU')
    p.add_argument('--threads', type=int, help='torch CPU threads (default: torch\'s)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--no-progress', action='store_true', help='no progress bars')
    p.add_argument('--out', required=True, metavar='DIR', help='output directory')
    p.set_defaults(func=_bench_handler)


def _register_cost(subparsers) -> None:
    p = subparsers.add_parser(
        'cost', help='join the study results with inference measurements into a CPT-vs-upcycling decision',
        description='Writes cost.json, cost.md (a section for the study report) and cost_breakeven.png into --out.')
    p.add_argument('--results', required=True, metavar='JSON', help="the study's results.json")
    p.add_argument('--inference', required=True, metavar='JSON', help="bench-inference's inference.json")
    p.add_argument('--top-k', type=int, help="the MoE's top-k to price (default: the study config's)")
    p.add_argument('--tail-points', type=int, default=3,
                   help='CPT budgets the extrapolation line is fitted over (default 3)')
    p.add_argument('--saturation-tol', type=float, default=1e-3,
                   help='CPT improvement per doubling of compute below which it counts as saturated (default 1e-3)')
    p.add_argument('--throughput-metric', choices=('total_tokens_per_s', 'output_tokens_per_s'),
                   default='total_tokens_per_s', help='processed (prompt + generated) tokens/s, the default, or '
                   'generated tokens/s only')
    p.add_argument('--out', required=True, metavar='DIR', help='output directory')
    p.set_defaults(func=_cost_handler)


def parse_ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(',') if x.strip())
    except ValueError:
        raise ValueError(f'{flag}: expected comma-separated integers, got {text!r}') from None
    if any(v <= 0 for v in values):
        raise ValueError(f'{flag}: values must be positive, got {text!r}')
    return values


def parse_rates(text: str) -> tuple[float, ...] | str:
    if text.strip() == 'auto':
        return 'auto'
    try:
        values = tuple(float(x) for x in text.split(',') if x.strip())
    except ValueError:
        raise ValueError(f"--rates: expected comma-separated numbers or 'auto', got {text!r}") from None
    if any(not v > 0 for v in values):
        raise ValueError(f'--rates: rates must be > 0, got {text!r}')
    return values


def _check_dir(path: str | None, flag: str) -> None:
    if path is not None and not Path(path).is_dir():
        raise ValueError(f'{flag}: {path} is not a directory')


def bench_config(args):
    """The BenchConfig an argparse namespace describes (device-dependent defaults resolved here)."""
    import dataclasses

    from . import inference as inf
    from .engines import resolve_device
    from .modes import CPU_WORKLOAD, PAPER_WORKLOAD, Workload, paper_workload
    from foundry_upcycle.shapes import SHAPES
    _check_dir(args.dense, '--dense')
    _check_dir(args.moe, '--moe')
    if args.shape not in SHAPES:
        raise ValueError(f'--shape: unknown shape {args.shape!r}; choose from {sorted(SHAPES)}')
    overrides = {field: getattr(args, f'shape_{flag}') for flag, field in SHAPE_FLAGS.items()
                 if getattr(args, f'shape_{flag}') is not None}
    shape = dataclasses.replace(SHAPES[args.shape], **overrides)
    gpu = resolve_device(args.device).type == 'cuda'
    default_in, default_out = PAPER_WORKLOAD if gpu else CPU_WORKLOAD
    given = {
        'input_tokens': args.input_tokens, 'output_tokens': args.output_tokens, 'num_requests': args.num_requests,
        'batch_sizes': None if args.batch_sizes is None else parse_ints(args.batch_sizes, '--batch-sizes'),
        'rates': parse_rates(args.rates) if args.rates is not None else None, 'start_rate': args.start_rate,
        'max_batch_size': args.max_batch_size, 'online_max_seconds': args.online_max_seconds,
        'drain_seconds': args.drain_seconds, 'repeats': args.repeats, 'seed': args.seed,
    }
    given = {k: v for k, v in given.items() if v is not None}
    if args.workload == 'paper':
        workload = paper_workload(**given)
    else:
        defaults = {'input_tokens': default_in, 'output_tokens': default_out, 'num_requests': 64 if gpu else 16,
                    'batch_sizes': (1, 4, 16, 64) if gpu else (1, 2, 4, 8), 'rates': 'auto', 'repeats': 3 if gpu else 1}
        workload = Workload(**{**defaults, **given})
    return inf.BenchConfig(workload=workload, shape=shape, dense_path=args.dense, moe_path=args.moe,
                           top_ks=parse_ints(args.top_k, '--top-k'), engine=args.engine, device=args.device,
                           dtype=args.dtype, threads=args.threads, progress=not args.no_progress)


def _bench_handler(args) -> int:
    from . import inference as inf
    from .outputs import render_max_throughput
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    result = inf.benchmark(bench_config(args), args.out)
    print(render_max_throughput(result))
    for name, path in result['files'].items():
        print(f'wrote {path}')
    return 0


def _cost_handler(args) -> int:
    from .cost import cost_report
    for flag, path in (('--results', args.results), ('--inference', args.inference)):
        if not Path(path).is_file():
            raise ValueError(f'{flag}: {path} does not exist or is not a file')
    cost = cost_report(args.results, args.inference, args.out, top_k=args.top_k, tail_points=args.tail_points,
                       saturation_tol=args.saturation_tol, throughput_metric=args.throughput_metric)
    for path in cost['files'].values():
        print(f'wrote {path}')
    return 0
