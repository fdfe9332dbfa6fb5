"""The weight transform: dense MPT FFN tensors -> MegaBlocks-layout expert tensors. Imports only torch.

Shapes: D d_model, F ffn_hidden_size, E num_experts.
  dense  ffn.up_proj.weight [F, D], ffn.gate_proj.weight [F, D] (GLU only), ffn.down_proj.weight [D, F]
  MoE    ffn.router.layer.weight [E, D]
         ffn.experts.mlp.w1 [E*F, D] (GLU: gate, MLP: up), ffn.experts.mlp.v1 [E*F, D] (GLU: up), ffn.experts.mlp.w2 [E*F, D] (down.T)
This layout is shared by llmfoundry's `torch_dmoe` and megablocks' `mb_dmoe` (no biases).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

import torch

_FFN_KEY = re.compile(r'^(?P<prefix>.*?transformer\.blocks\.)(?P<layer>\d+)\.ffn\.(?P<rest>.+)$')
_DENSE_PARAMS = ('up_proj.weight', 'gate_proj.weight', 'down_proj.weight')
_MOE_MARKERS = ('router.layer.weight', 'experts.mlp.w1')


@dataclass(frozen=True)
class DenseFFN:
    """One block's dense FFN tensors."""
    up: torch.Tensor          # [F, D]
    down: torch.Tensor        # [D, F]
    gate: Optional[torch.Tensor] = None  # [F, D], GLU only

    @property
    def glu(self) -> bool:
        return self.gate is not None


def split_ffn_keys(state_dict: Mapping[str, torch.Tensor]) -> tuple[str, dict[int, dict[str, torch.Tensor]]]:
    """Groups `...transformer.blocks.{i}.ffn.*` tensors by block. Returns (key prefix, {i: {rest: tensor}})."""
    prefixes, blocks = set(), {}
    for key, value in state_dict.items():
        m = _FFN_KEY.match(key)
        if m:
            prefixes.add(m['prefix'])
            blocks.setdefault(int(m['layer']), {})[m['rest']] = value
    if not blocks:
        raise ValueError('no `transformer.blocks.<i>.ffn.*` tensors found: not an MPT state dict')
    if len(prefixes) != 1:
        raise ValueError(f'FFN keys under several prefixes {sorted(prefixes)}: cannot tell which model to upcycle')
    return prefixes.pop(), blocks


def dense_ffn(layer: int, tensors: Mapping[str, torch.Tensor]) -> DenseFFN:
    """Validates one block's dense FFN tensors, raising ValueError for MoE or biased checkpoints."""
    if any(k in tensors for k in _MOE_MARKERS):
        raise ValueError(f'block {layer} already has a mixture-of-experts FFN: the checkpoint is MoE, not dense')
    biases = sorted(k for k in tensors if k.endswith('.bias'))
    if biases:
        raise ValueError(f'block {layer} has dense FFN biases {biases}, which MoE experts cannot hold')
    unknown = sorted(set(tensors) - set(_DENSE_PARAMS))
    if unknown or 'up_proj.weight' not in tensors or 'down_proj.weight' not in tensors:
        raise ValueError(f'block {layer}: unsupported FFN tensors {sorted(tensors)} (expected {list(_DENSE_PARAMS)})')
    ffn = DenseFFN(up=tensors['up_proj.weight'], down=tensors['down_proj.weight'], gate=tensors.get('gate_proj.weight'))
    f, d = ffn.up.shape
    if ffn.down.shape != (d, f) or (ffn.glu and ffn.gate.shape != (f, d)):
        raise ValueError(f'block {layer}: inconsistent FFN shapes up {tuple(ffn.up.shape)}, down {tuple(ffn.down.shape)}')
    return ffn


def expert_copies(weight: torch.Tensor, num_experts: int, noise_std: float = 0.0,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """[F, D] -> [E*F, D]: E copies; with noise_std > 0 each copy gets N(0, (noise_std * std(weight))^2) noise."""
    tiled = weight.unsqueeze(0).expand(num_experts, *weight.shape)  # [E, F, D]
    if noise_std > 0:
        noise = torch.randn(tiled.shape, generator=generator, dtype=torch.float32)
        tiled = tiled + (noise * noise_std * weight.float().std()).to(weight.dtype)
    return tiled.reshape(num_experts * weight.shape[0], weight.shape[1]).contiguous()


def router_weight(num_experts: int, d_model: int, std: float, generator: torch.Generator,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A fresh router [E, D] ~ N(0, std^2). Random, not zero: a zero router gives every expert equal scores."""
    return (torch.randn(num_experts, d_model, generator=generator) * std).to(dtype)


def moe_ffn_tensors(ffn: DenseFFN, num_experts: int, router_init_std: float, generator: torch.Generator,
                    expert_noise_std: float = 0.0, expert_output_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """One block's MoE tensors (keys relative to `ffn.`) from its dense FFN. expert_output_scale multiplies w2
    (E/K for softmax router weights without renormalisation; see UpcycleConfig.expert_output_scale)."""
    first, second = (ffn.gate, ffn.up) if ffn.glu else (ffn.up, None)
    out = {'router.layer.weight': router_weight(num_experts, ffn.up.shape[1], router_init_std, generator, ffn.up.dtype)}
    out['experts.mlp.w1'] = expert_copies(first, num_experts, expert_noise_std, generator)
    if second is not None:
        out['experts.mlp.v1'] = expert_copies(second, num_experts, expert_noise_std, generator)
    w2 = expert_copies(ffn.down.t(), num_experts, expert_noise_std, generator)
    out['experts.mlp.w2'] = w2 if expert_output_scale == 1.0 else (w2.float() * expert_output_scale).to(w2.dtype)
    return out


def upcycle_state_dict(state_dict: Mapping[str, torch.Tensor], num_experts: int, router_init_std: float = 0.02,
                       seed: int = 0, expert_noise_std: float = 0.0,
                       expert_output_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """A dense MPT state dict (any key prefix, e.g. Composer's `model.`) -> its upcycled MoE state dict.

    Non-FFN tensors pass through unchanged (same objects). Deterministic in `seed`, so every rank of a
    distributed run builds the same routers.
    """
    if num_experts < 2:
        raise ValueError(f'num_experts must be >= 2, got {num_experts}')
    prefix, blocks = split_ffn_keys(state_dict)
    generator = torch.Generator().manual_seed(seed)
    out = {k: v for k, v in state_dict.items() if not _FFN_KEY.match(k)}
    for layer in sorted(blocks):
        tensors = moe_ffn_tensors(dense_ffn(layer, blocks[layer]), num_experts, router_init_std, generator,
                                  expert_noise_std, expert_output_scale)
        out.update({f'{prefix}{layer}.ffn.{k}': v for k, v in tensors.items()})
    return out


def expert_spread(w1: torch.Tensor, num_experts: int) -> float:
    """Max abs difference between any expert's slice of an [E*F, D] tensor and expert 0's (0.0: fresh copies)."""
    experts = w1.detach().reshape(num_experts, -1, w1.shape[-1])  # [E, F, D]
    return (experts - experts[:1]).abs().max().item()


def check_shapes(moe_state: Mapping[str, torch.Tensor], expected: Mapping[str, Iterable[int]], source: str) -> None:
    """ValueError naming the first key whose shape (or presence) differs from the model's."""
    missing = sorted(set(expected) - set(moe_state))
    extra = sorted(set(moe_state) - set(expected))
    if missing or extra:
        raise ValueError(
            f'{source}: checkpoint does not match the model config: missing {missing[:5]}'
            f'{"..." if len(missing) > 5 else ""}, unexpected {extra[:5]}{"..." if len(extra) > 5 else ""}',
        )
    for key, shape in expected.items():
        if tuple(moe_state[key].shape) != tuple(shape):
            raise ValueError(
                f'{source}: {key} has shape {tuple(moe_state[key].shape)} after upcycling but the model '
                f'config expects {tuple(shape)} (check d_model, ffn_hidden_size/expansion_ratio, n_layers)',
            )
