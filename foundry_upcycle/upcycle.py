"""The MPT mapping: a dense MPT state dict -> its upcycled MoE (MegaBlocks layout), as a plan of tensor jobs.

Used by the `upcycle_loader` callback (streamed into the training model) and `foundry-upcycle convert` (streamed
to disk); the weight math is `weights.py`. Imports only torch.

Shapes: D d_model, F ffn_hidden_size, E num_experts, G granularity (N = E*G experts of width f = F/G).
  dense  ffn.up_proj.weight [F, D], ffn.gate_proj.weight [F, D] (GLU only), ffn.down_proj.weight [D, F]
  MoE    ffn.router.layer.weight [N, D]
         ffn.experts.mlp.w1 [N*f, D] (GLU: gate, MLP: up), ffn.experts.mlp.v1 [N*f, D] (GLU: up), ffn.experts.mlp.w2 [N*f, D] (down.T)
This layout is shared by llmfoundry's `torch_dmoe` and megablocks' `mb_dmoe` (no biases).
Per block: a dense block in `moe_layers` is upcycled, one outside it passes through dense; an MoE block of the
source (grow > 1) has each expert and router row repeated m times (`weights.grown_rows`).
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping, Optional

import torch

from foundry_upcycle.jobs import Job, MemorySource, TensorSpec, run_jobs
from foundry_upcycle.moe_layers import moe_layer_indices
from foundry_upcycle.weights import (UpcycleWeights, expert_copies, expert_spread, expert_tensor,  # noqa: F401
                                     grown_rows, router_weight)

# The GLU matrices under their three names. Llama/Mistral dense MLP -> Mixtral expert: gate_proj [F, D] -> w1,
# up_proj [F, D] -> w3, down_proj [D, F] -> w2. MegaBlocks / torch_dmoe expert tensor -> dense matrix:
# w1 = gate, v1 = up, w2 = down.T (stored [E*F, D], so each expert's slice is transposed back).
MIXTRAL_EXPERT_NAMES = {'gate_proj': 'w1', 'up_proj': 'w3', 'down_proj': 'w2'}
MEGABLOCKS_TO_DENSE = {'w1': ('gate_proj', False), 'v1': ('up_proj', False), 'w2': ('down_proj', True)}

_FFN_KEY = re.compile(r'^(?P<prefix>.*?transformer\.blocks\.)(?P<layer>\d+)\.ffn\.(?P<rest>.+)$')
_DENSE_PARAMS = ('up_proj.weight', 'gate_proj.weight', 'down_proj.weight')
_MOE_MARKERS = ('router.layer.weight', 'experts.mlp.w1')
_MOE_PARAMS = ('router.layer.weight', 'experts.mlp.w1', 'experts.mlp.v1', 'experts.mlp.w2')


def split_ffn_keys(names: Iterable[str]) -> tuple[str, dict[int, dict[str, str]]]:
    """Groups `...transformer.blocks.{i}.ffn.*` names by block. Returns (prefix up to `blocks.`, {i: {rest: name}})."""
    prefixes, blocks = set(), {}
    for key in names:
        m = _FFN_KEY.match(key)
        if m:
            prefixes.add(m['prefix'])
            blocks.setdefault(int(m['layer']), {})[m['rest']] = key
    if not blocks:
        raise ValueError('no `transformer.blocks.<i>.ffn.*` tensors found: not an MPT state dict')
    if len(prefixes) != 1:
        raise ValueError(f'FFN keys under several prefixes {sorted(prefixes)}: cannot tell which model to upcycle')
    return prefixes.pop(), blocks


def is_moe_block(specs: Mapping[str, TensorSpec]) -> bool:
    return any(k in specs for k in _MOE_MARKERS)


def check_dense_ffn(layer: int, specs: Mapping[str, TensorSpec]) -> bool:
    """Validates one block's dense FFN ({rest: spec}); returns whether it is a GLU. ValueError for MoE or biases."""
    if is_moe_block(specs):
        raise ValueError(f'block {layer} already has a mixture-of-experts FFN: the checkpoint is MoE, not dense '
                         '(upcycle.grow adds experts to an MoE checkpoint)')
    biases = sorted(k for k in specs if k.endswith('.bias'))
    if biases:
        raise ValueError(f'block {layer} has dense FFN biases {biases}, which MoE experts cannot hold')
    unknown = sorted(set(specs) - set(_DENSE_PARAMS))
    if unknown or 'up_proj.weight' not in specs or 'down_proj.weight' not in specs:
        raise ValueError(f'block {layer}: unsupported FFN tensors {sorted(specs)} (expected {list(_DENSE_PARAMS)})')
    f, d = specs['up_proj.weight'].shape
    gate = specs.get('gate_proj.weight')
    if specs['down_proj.weight'].shape != (d, f) or (gate is not None and gate.shape != (f, d)):
        raise ValueError(f'block {layer}: inconsistent FFN shapes up {(f, d)}, down {specs["down_proj.weight"].shape}')
    return gate is not None


def ffn_jobs(source, names: Mapping[str, str], layer: int, opts: UpcycleWeights, out: str) -> list[Job]:
    """One block's MoE jobs: router, w1, (v1), w2, named `{out}router.layer.weight` etc. names: {rest: source name}."""
    glu = check_dense_ffn(layer, {rest: source.specs[n] for rest, n in names.items()})
    up = source.specs[names['up_proj.weight']]
    (f, d), dtype, E = up.shape, up.dtype, opts.num_experts * opts.granularity
    f //= opts.granularity   # rows per expert; E * f = num_experts * F rows in all
    # (MegaBlocks tensor, dense source, role); 'down' is stored transposed: down.T [F, D]
    roles = [('w1', 'gate_proj.weight', 'gate'), ('v1', 'up_proj.weight', 'up')] if glu else \
        [('w1', 'up_proj.weight', 'up')]
    roles.append(('w2', 'down_proj.weight', 'down'))

    def tiled(rest: str, role: str) -> list[torch.Tensor]:
        dense = source.read(names[rest])
        return [expert_tensor(dense.t() if role == 'down' else dense, opts, layer, role)]

    jobs = [Job((TensorSpec(f'{out}router.layer.weight', (E, d), dtype),),
                lambda: [router_weight(opts, layer, d, dtype)])]
    for mb, rest, role in roles:
        spec = TensorSpec(f'{out}experts.mlp.{mb}', (E * f, d), source.specs[names[rest]].dtype)
        jobs.append(Job((spec,), lambda rest=rest, role=role: tiled(rest, role)))
    return jobs


def grow_jobs(source, names: Mapping[str, str], layer: int, opts: UpcycleWeights, out: str) -> list[Job]:
    """One MoE block of the source grown m-fold: each expert's rows and its router row repeated m times."""
    specs = {rest: source.specs[n] for rest, n in names.items()}
    unknown = sorted(set(specs) - set(_MOE_PARAMS))
    if unknown or 'router.layer.weight' not in specs or 'experts.mlp.w2' not in specs:
        raise ValueError(f'block {layer}: unsupported MoE tensors {sorted(specs)} (expected {list(_MOE_PARAMS)}, '
                         'no biases)')
    n = specs['router.layer.weight'].shape[0]
    want = opts.num_experts * opts.granularity
    if n != want:
        raise ValueError(f'block {layer} of the MoE checkpoint has {n} experts, but upcycle.num_experts x granularity '
                         f'= {want}: with grow, the block describes the checkpoint being grown (its recipe\'s block)')
    jobs = []
    for rest, spec in specs.items():
        shape = (spec.shape[0] * opts.grow, *spec.shape[1:])
        jobs.append(Job((TensorSpec(out + rest, shape, spec.dtype),),
                        lambda name=names[rest]: [grown_rows(source.read(name), n, opts.grow)]))
    return jobs


def block_jobs(source, names: Mapping[str, str], layer: int, opts: UpcycleWeights, out: str, moe: bool) -> list[Job]:
    """One block's FFN: upcycled (dense source, an MoE block of the model), grown (MoE source) or passed through
    (a dense block of the model)."""
    specs = {rest: source.specs[n] for rest, n in names.items()}
    if not moe:
        if is_moe_block(specs):
            raise ValueError(f'block {layer} is a mixture of experts in the checkpoint but stays dense under '
                             'upcycle.moe_layers')
        check_dense_ffn(layer, specs)
        return [Job((TensorSpec(out + rest, spec.shape, spec.dtype),), lambda n=names[rest]: [source.read(n)])
                for rest, spec in specs.items()]
    if is_moe_block(specs):
        if opts.grow == 1:
            check_dense_ffn(layer, specs)   # raises: already MoE
        return grow_jobs(source, names, layer, opts, out)
    if opts.grow > 1:
        raise ValueError(f'upcycle.grow={opts.grow}: block {layer} of the checkpoint is dense; grow adds experts to '
                         'the MoE blocks of an MoE checkpoint (with the same moe_layers)')
    return ffn_jobs(source, names, layer, opts, out)


def mpt_moe_jobs(source, opts: UpcycleWeights, out_prefix: Optional[str] = None) -> list[Job]:
    """The upcycled model's tensors as lazy jobs over an MPT source (any key prefix, e.g. Composer's `model.`),
    in the source's order: non-FFN tensors pass through, each block's FFN becomes its router and expert tensors
    (`block_jobs`). out_prefix replaces the source's key prefix (the part before `transformer.`) in the output
    names."""
    prefix, blocks = split_ffn_keys(source.specs)
    moe = set(moe_layer_indices(opts.moe_layers, max(blocks) + 1, 'upcycle.moe_layers'))
    model_prefix = prefix[:-len('transformer.blocks.')]
    out_prefix = model_prefix if out_prefix is None else out_prefix

    def rename(name: str) -> str:
        return out_prefix + name[len(model_prefix):] if name.startswith(model_prefix) else name

    jobs, done = [], set()
    for name, spec in source.specs.items():
        m = _FFN_KEY.match(name)
        if m is None:
            jobs.append(Job((TensorSpec(rename(name), spec.shape, spec.dtype),), lambda n=name: [source.read(n)]))
        elif int(m['layer']) not in done:
            layer = int(m['layer'])
            done.add(layer)
            jobs += block_jobs(source, blocks[layer], layer, opts, rename(f'{prefix}{layer}.ffn.'), layer in moe)
    return jobs


def upcycle_state_dict(state_dict: Mapping[str, torch.Tensor], num_experts: int, router_init_std: float = 0.02,
                       seed: int = 0, expert_noise_std: float = 0.0, expert_output_scale: float = 1.0,
                       **variants) -> dict[str, torch.Tensor]:
    """A dense (or, with grow, MoE) MPT state dict -> its upcycled MoE state dict, all in memory (tests and small
    models; the loader and `convert` stream the same jobs instead). Non-FFN tensors pass through (sharing memory).
    variants: the other `weights.UpcycleWeights` fields (granularity, drop_ratio, grow, moe_layers)."""
    opts = UpcycleWeights(num_experts, router_init_std, seed, expert_noise_std, expert_output_scale, **variants)
    return run_jobs(mpt_moe_jobs(MemorySource(state_dict), opts))


def ffn_moe_tensors(dense: Mapping[str, torch.Tensor], opts: UpcycleWeights, layer: int = 0) -> dict[str, torch.Tensor]:
    """One dense FFN ({'up_proj.weight', 'down_proj.weight'[, 'gate_proj.weight']}) -> its MoE tensors
    ({'router.layer.weight', 'experts.mlp.w1', ...}) as block `layer` of a model would get them."""
    return run_jobs(ffn_jobs(MemorySource(dense), {k: k for k in dense}, layer, opts, ''))


def check_shapes(moe_state: Mapping[str, Iterable[int]], expected: Mapping[str, Iterable[int]], source: str) -> None:
    """ValueError naming the first key whose shape (or presence) differs from the model's. Values: shapes or
    anything with a `.shape`."""
    missing = sorted(set(expected) - set(moe_state))
    extra = sorted(set(moe_state) - set(expected))
    if missing or extra:
        raise ValueError(
            f'{source}: checkpoint does not match the model config: missing {missing[:5]}'
            f'{"..." if len(missing) > 5 else ""}, unexpected {extra[:5]}{"..." if len(extra) > 5 else ""}',
        )
    for key, shape in expected.items():
        got = tuple(getattr(moe_state[key], 'shape', moe_state[key]))
        if got != tuple(shape):
            raise ValueError(
                f'{source}: {key} has shape {got} after upcycling but the model '
                f'config expects {tuple(shape)} (check d_model, ffn_hidden_size/expansion_ratio, n_layers)',
            )
