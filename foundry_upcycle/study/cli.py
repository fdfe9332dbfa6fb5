"""`foundry-upcycle study`: the CPT-vs-upcycling study end to end. Imports only stdlib at module level."""
from __future__ import annotations

import argparse
from typing import Any

EPILOG = """\
examples:
  foundry-upcycle study --out runs/default                   # the built-in CPU study (paper regime, <= 20 min, 2 cores)
  foundry-upcycle study --preset paper-curve                 # the paper's whole curve: budgets 0.1-1.0, 3 seeds each
  foundry-upcycle study --lr-sweep 1e-3,2e-3,4e-3,8e-3       # another lr grid (each arm's best on validation)
  foundry-upcycle study --pretrain-tokens-per-param 16,64    # two bases: upcycling's gain vs pretraining length
  foundry-upcycle study --router-weights softmax             # ablation: He et al.'s router for the upcycled arm
  foundry-upcycle study --variants paper,drop0.5,granular2,every2   # the variants against CPT and the paper (~1 h)
  foundry-upcycle study --preset undertrained                # the earlier, under-trained default
  foundry-upcycle study --budgets 0.25,1 --skip-inference    # fewer budgets, no export / inference benchmark
  foundry-upcycle study --generic-dir my/prose --domain-dir my/domain    # your own text folders
  foundry-upcycle study --hf-base smollm2-hf --pretrain-tokens 2e12 --budgets 3e-8 --seeds 1 \\
      --seeds-other 1 --no-lr-sweep --skip-inference   # a real dense HF Llama as the base (README: The study)
  foundry-upcycle study --scale 436m --mds-dir my-mds --tokenizer my-tok \\
      --dense-checkpoint dense.pt --pretrain-tokens 43600000000 --nproc 8     # paper shapes on a GPU node

Rerunning with the same --out skips finished stages whose config is unchanged and resumes an interrupted one.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        'study', help='CPT vs sparse upcycling at matched training FLOPs, end to end, with a report',
        description='Dense pretraining, then continued pretraining (CPT) and upcycling at matched training FLOPs '
                    'for each budget, evaluation of every arm, an HF export + inference benchmark + cost report, '
                    'and report.md with plots. Flags override the --config file.',
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--config', metavar='YAML', help='study config file (see foundry_upcycle/study/config.py)')
    p.add_argument('--preset', choices=('paper-curve', 'undertrained'), help='named settings under the config file '
                   'and flags; paper-curve: all the paper\'s budgets (0.1-1.0), 3 seeds each; undertrained: the earlier '
                   'default (0.5 tokens per parameter, not the paper\'s regime)')
    p.add_argument('--out', help='output folder (default runs/default)')
    p.add_argument('--scale', choices=('tiny', '436m', '1.4b'),
                   help='tiny: the built-in CPU study; 436m / 1.4b: the paper\'s shapes on your MDS data (GPU)')
    p.add_argument('--budgets', help='training budgets as fractions of the dense pretraining FLOPs, comma-separated '
                   '(default 0.1,0.2,0.4; the paper\'s: 0.1,0.2,0.4,0.8,1.0)')
    p.add_argument('--seed', type=int, help='training seed (default 17)')
    p.add_argument('--pretrain-steps', type=int, help='dense pretraining steps of the tiny base (default 850: 64 '
                   'tokens per parameter)')
    p.add_argument('--pretrain-tokens-per-param', metavar='N[,N...]', help='pretraining length of the tiny base in '
                   'tokens per parameter instead of steps; several values (e.g. 16,64,128): one study per base in '
                   '<out>/tpp<N>/ and a report of upcycling\'s gain against the base\'s training length')
    p.add_argument('--seeds', type=int, help='phase-2 seeds (data order + router init) at the largest budget (default 3)')
    p.add_argument('--seeds-other', type=int, help='phase-2 seeds at the other budgets (default 2)')
    p.add_argument('--lr', type=float, help='phase-2 lr of CPT (and of upcycling unless --upcycle-lr)')
    p.add_argument('--upcycle-lr', type=float, help='phase-2 lr of upcycling')
    p.add_argument('--lr-sweep', metavar='LR,LR,...', help='the phase-2 lr grid each arm is tried at, smallest budget, '
                   'seed 0 (default 2.8e-3,5.6e-3,1.12e-2,2.24e-2 for the tiny study); each arm trains every budget at '
                   'its best on the validation split, the grid extended past an edge optimum')
    p.add_argument('--lr-extend', type=int, help='grid steps added past an edge optimum, per arm (default 2)')
    p.add_argument('--lr-check', choices=('up', 'both', 'off'), help='check the lr choice at the largest budget, '
                   'seed 0, at the grid neighbour above (up, the default), both neighbours, or not (off)')
    p.add_argument('--no-lr-sweep', action='store_true', help='no lr sweep: the recipes\' lrs (or --lr / --upcycle-lr)')
    p.add_argument('--variants', metavar='NAME,NAME,...', help='upcycling variants trained beside CPT and the paper\'s '
                   'recipe (`paper`), each at the same matched FLOPs and seeds, reported against both: dropR '
                   '(Drop-Upcycling, e.g. drop0.5), granularG (fine-grained experts, e.g. granular2), everyN (MoE on '
                   'every N-th block, e.g. every2)')
    p.add_argument('--router-weights', choices=('renormalized', 'softmax'), help='ablation: how the upcycled '
                   'router weighs its top-k experts (renormalized: the default, Mixtral-compatible; softmax: He et '
                   'al. 2024, no renormalisation, w2 scaled by E/K)')
    g = p.add_argument_group('data (tiny scale)')
    g.add_argument('--generic-dir', help='your generic text folder for dense pretraining (default: built-in plays)')
    g.add_argument('--domain-dir', help='your domain text folder for CPT / upcycling (default: built-in code + prose)')
    g = p.add_argument_group('a real base')
    g.add_argument('--hf-base', metavar='DIR', help='a dense Hugging Face Llama / Mistral directory as the base '
                   '(no pretraining here): CPT vs upcycling of it with yamls/hf on the built-in data in its own '
                   'tokenizer; needs --pretrain-tokens (what it was pretrained on; budgets: fractions of those FLOPs)')
    g = p.add_argument_group('paper scale (436m / 1.4b)')
    g.add_argument('--mds-dir', help='domain-mix MDS data with train/ and val/')
    g.add_argument('--generic-mds-dir', help='optional generic MDS data with val/ (held-out generic CE)')
    g.add_argument('--tokenizer', help='Hugging Face tokenizer folder')
    g.add_argument('--dense-checkpoint', help='the dense Composer checkpoint to start from (skips pretraining)')
    g.add_argument('--pretrain-tokens', type=_tokens, help='tokens the dense checkpoint (or --hf-base) was '
                   'pretrained on (e.g. 43600000000 or 4.36e10)')
    g.add_argument('--nproc', type=int, help='processes per training run (composer -n N); default: visible GPUs')
    g = p.add_argument_group('evaluation and inference')
    g.add_argument('--eval-data', metavar='PATH', help='llm-foundry scripts/eval/local_data checkout for the ICL '
                   'gauntlet (default: the samples of the default tasks shipped in the package; "none": '
                   'cross-entropy only)')
    g.add_argument('--tasks', help="ICL tasks: 'default', 'all' or comma-separated v0.3 task names")
    g.add_argument('--eval-examples', type=int, help='examples per ICL task (default 40)')
    g.add_argument('--skip-inference', action='store_true', help='no HF export, inference benchmark or cost report')
    p.add_argument('--threads', type=int, help='torch CPU threads (default 1: reproducible, and fastest on a shared '
                   'machine)')
    p.add_argument('--jobs', type=int, help='phase-2 runs trained at once in worker processes (default: one per '
                   'free core on a CPU-only tiny study; the results do not depend on it)')
    p.add_argument('--no-timing', action='store_true', help='skip the interleaved step-time measurement')
    p.add_argument('--no-progress', action='store_true', help='no per-stage lines or progress bars')
    p.set_defaults(func=handler)


def _tokens(text: str) -> int:
    """A token count: an integer, or a whole number written as a float (2e12)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a number of tokens') from None
    if not value.is_integer() or value < 1:
        raise argparse.ArgumentTypeError(f'{text!r} is not a whole, positive number of tokens')
    return int(value)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The config keys the flags set (only flags given on the command line)."""
    out: dict[str, Any] = {}
    for flag in ('out', 'scale', 'budgets', 'seed', 'pretrain_steps', 'mds_dir', 'generic_mds_dir', 'tokenizer',
                 'dense_checkpoint', 'pretrain_tokens', 'nproc', 'threads', 'jobs', 'seeds', 'seeds_other', 'lr',
                 'upcycle_lr', 'lr_sweep', 'pretrain_tokens_per_param', 'hf_base', 'lr_extend', 'lr_check'):
        if getattr(args, flag) is not None:
            out[flag] = getattr(args, flag)
    if getattr(args, 'variants', None):
        from foundry_upcycle.study.arms import variant_arms
        out['arms'] = list(variant_arms(args.variants))
    if args.router_weights is not None:
        out['upcycle'] = {'router_weights': args.router_weights}
    if args.no_timing:
        out['timing'] = False
    if args.no_lr_sweep:
        out['lr_sweep'] = []
    data = {k: getattr(args, k) for k in ('generic_dir', 'domain_dir') if getattr(args, k) is not None}
    if data:
        out['data'] = data
    ev: dict[str, Any] = {}
    if args.eval_data is not None:
        ev['local_data'] = None if args.eval_data.lower() == 'none' else args.eval_data
    if args.tasks is not None:
        ev['tasks'] = args.tasks if args.tasks in ('default', 'all') else [
            t.strip() for t in args.tasks.split(',') if t.strip()]
    if args.eval_examples is not None:
        ev['max_examples_per_task'] = args.eval_examples
    if ev:
        out['eval'] = ev
    if args.skip_inference:
        out['inference'] = {'skip': True}
    if args.no_progress:
        out['progress'] = False
    return out


def config_from_args(args: argparse.Namespace):
    from foundry_upcycle.study.config import StudyConfig, merge
    from foundry_upcycle.study.config import PRESETS
    overrides = overrides_from_args(args)
    base = PRESETS[args.preset] if getattr(args, 'preset', None) else {}
    if args.config:
        return StudyConfig.from_yaml(args.config, overrides, base=base)
    return StudyConfig.from_mapping(merge(base, overrides))


def handler(args: argparse.Namespace) -> int:
    import logging
    for noisy in ('composer', 'streaming', 'llmfoundry'):
        if not getattr(args, 'verbose', False):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    from foundry_upcycle.study.config import check_paths
    cfg = config_from_args(args)
    check_paths(cfg)           # before the heavy imports: bad paths fail in a second
    from foundry_upcycle.study.pipeline import run_study
    run_study(cfg)
    return 0
