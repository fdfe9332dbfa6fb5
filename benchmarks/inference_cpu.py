"""CPU inference benchmark: tiny synthetic dense Llama vs its 8-expert upcycled Mixtral at top-1 and top-2.

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 python benchmarks/inference_cpu.py [bench-inference flags]

Defaults: shape tiny (d_model 64, 2 layers, FFN 160, vocab 256), 64 input / 16 output tokens, 32 requests per
setting, batch sizes 1,2,4,8, request rates 'auto', 3 repeats per setting (the median is reported), 1 torch
thread (tiny models are overhead-bound, and a multi-threaded matmul this small slows down badly when other
processes share the cores), output in runs/bench-inference-cpu. Any `foundry-upcycle bench-inference` flag
overrides these (e.g. --shape 436m --threads 2).
Prints the max-throughput table; writes inference.json, latency_vs_throughput.png, max_throughput.md.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')

from foundry_upcycle.bench import cli  # noqa: E402

CPU_DEFAULTS = ['--device', 'cpu', '--engine', 'hf', '--shape', 'tiny', '--threads', '1',
                '--num-requests', '32', '--batch-sizes', '1,2,4,8', '--rates', 'auto', '--repeats', '3',
                '--out', 'runs/bench-inference-cpu']


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog='inference_cpu.py')
    cli.register(parser.add_subparsers(dest='command', required=True))
    args = parser.parse_args(['bench-inference', *CPU_DEFAULTS, *argv])  # later flags win
    try:
        return args.func(args)
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
