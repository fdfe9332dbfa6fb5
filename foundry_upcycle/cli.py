"""`foundry-upcycle`: one command on top of the plugin and its tools. Subcommands import their tools lazily."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:
    from foundry_upcycle.config import UpcycleConfig

# Tool modules that add subcommands through `register(subparsers)`; each imports only argparse at top level.
TOOL_CLIS = ('foundry_upcycle.export.cli', 'foundry_upcycle.bench.cli', 'foundry_upcycle.study.cli')


def _block_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('upcycle block (overrides the recipe\'s `upcycle:` block)')
    g.add_argument('--num-experts', type=int)
    g.add_argument('--top-k', type=int)
    g.add_argument('--router-init-std', type=float)
    g.add_argument('--seed', type=int)
    g.add_argument('--expert-noise-std', type=float)
    g.add_argument('--granularity', type=int, help='fine-grained experts: G shards of width F/G per copy')
    g.add_argument('--drop-ratio', type=float, help='Drop-Upcycling: fraction of each expert re-drawn')
    g.add_argument('--moe-layers', help='MoE on some blocks: N (blocks 0, N, 2N, ...) or a list like 0,2,5 '
                   '(one block: 3,)')
    g.add_argument('--grow', type=int, help='the checkpoint is an MoE: copy each expert M times, top-k x M')


def _moe_layers(text: str):
    try:
        values = [int(v) for v in text.split(',') if v.strip()]
    except ValueError:
        raise ValueError(f'--moe-layers: expected N or a comma-separated list of block indices, got {text!r}') from None
    return values[0] if len(values) == 1 and ',' not in text else values


def _block(args: argparse.Namespace, recipe: Optional[dict]) -> 'UpcycleConfig':
    from foundry_upcycle.config import UpcycleConfig
    block = dict((recipe or {}).get('upcycle') or {})
    for key in ('num_experts', 'top_k', 'router_init_std', 'seed', 'expert_noise_std', 'granularity', 'drop_ratio',
                'grow'):
        if getattr(args, key) is not None:
            block[key] = getattr(args, key)
    if args.moe_layers is not None:
        block['moe_layers'] = _moe_layers(args.moe_layers)
    return UpcycleConfig.from_mapping(block)


def cmd_convert(args: argparse.Namespace) -> int:
    from foundry_upcycle.convert import convert
    from foundry_upcycle.recipes import load_recipe
    recipe = load_recipe(args.recipe, args.set) if args.recipe else None
    out = convert(args.dense, args.out, _block(args, recipe), recipe['model'] if recipe else None, args.overwrite)
    print(f'wrote {out}')
    return 0


def cmd_expand(args: argparse.Namespace) -> int:
    from foundry_upcycle.convert import offline_recipe
    from foundry_upcycle.recipes import dump_yaml, load_recipe
    from foundry_upcycle.transforms import apply_upcycle_block
    cfg = apply_upcycle_block(load_recipe(args.recipe, args.overrides))
    if args.offline_checkpoint:
        cfg = offline_recipe(cfg, args.offline_checkpoint)
    text = dump_yaml(cfg)
    if args.out:
        from foundry_upcycle.atomic import atomic_write
        atomic_write(args.out, lambda tmp: open(tmp, 'w').write(text))
    else:
        sys.stdout.write(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='foundry-upcycle', description=__doc__)
    parser.add_argument('-v', '--verbose', action='store_true', help='debug logging')
    sub = parser.add_subparsers(dest='command', required=True)

    p = sub.add_parser('convert', help='dense checkpoint -> upcycled MoE checkpoint (for load_path users)')
    p.add_argument('dense', help='dense Composer checkpoint (.pt) or .safetensors state dict (an MoE one with --grow)')
    p.add_argument('--out', required=True, help='output: .pt (weights-only Composer checkpoint) or .safetensors')
    p.add_argument('--recipe', help='upcycling recipe: its upcycle block gives the defaults, its model block is checked')
    p.add_argument('--set', nargs='*', default=[], metavar='KEY=VALUE', help='recipe overrides (dotlist)')
    p.add_argument('--overwrite', action='store_true')
    _block_flags(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser('expand', help='print a recipe with its upcycle block expanded (for llmfoundry eval, review)')
    p.add_argument('recipe')
    p.add_argument('overrides', nargs='*', metavar='KEY=VALUE')
    p.add_argument('--offline-checkpoint', help='load this converted MoE checkpoint via load_path instead')
    p.add_argument('--out', help='write the YAML here instead of stdout')
    p.set_defaults(func=cmd_expand)

    for module in TOOL_CLIS:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    for noisy in ('urllib3', 'matplotlib', 'PIL', 'filelock', 'fsspec'):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
