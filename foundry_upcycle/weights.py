"""The weight math of upcycling: one expert matrix or one router from the dense weights. Imports only torch.

Every output is a pure function of (dense tensor, layer index, options): each has its own random stream, seeded
by (seed, layer, purpose[, expert]), so any tensor can be produced alone, in any order, on any rank, and comes out
the same. The mappings (`upcycle.py` for MPT, `llama_to_mixtral.py` for Hugging Face) call these functions per
tensor; the disk writer and the in-training loader consume the mappings' jobs.

Shapes: D d_model, F ffn_hidden_size, E num_experts. Expert matrices are handled in [F, D] orientation:
  gate [F, D], up [F, D], down.T [F, D]   (roles 'gate', 'up', 'down')
so MegaBlocks' `w1`/`v1`/`w2` [E*F, D] are E of them stacked, and Mixtral's per-expert w1/w3 [F, D] are one each
(its w2 [D, F] is the transpose of the 'down' one).
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any, Mapping

import torch

ROLES = ('gate', 'up', 'down')


@dataclass(frozen=True)
class UpcycleWeights:
    """What the weight math needs from the `upcycle:` block (`config.UpcycleConfig.weights()` builds it).

    expert_output_scale multiplies every expert's down projection (E/K for softmax router weights without
    renormalisation; see `config.UpcycleConfig.expert_output_scale`)."""

    num_experts: int
    router_init_std: float = 0.02
    seed: int = 0
    expert_noise_std: float = 0.0
    expert_output_scale: float = 1.0

    # Written to the loader callback's YAML entry always; other fields only when they differ from their default.
    ALWAYS_WRITTEN = ('num_experts', 'router_init_std', 'seed', 'expert_noise_std')

    def __post_init__(self):
        if not isinstance(self.num_experts, int) or self.num_experts < 2:
            raise ValueError(f'num_experts must be an integer >= 2, got {self.num_experts!r}')
        if not self.router_init_std > 0:
            raise ValueError(f'router_init_std must be > 0 (a zero router breaks routing), got {self.router_init_std}')
        if self.expert_noise_std < 0:
            raise ValueError(f'expert_noise_std must be >= 0, got {self.expert_noise_std}')

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any], what: str = 'upcycle') -> 'UpcycleWeights':
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ValueError(f'{what}: unknown weight option(s) {unknown}; known: {sorted(names)}')
        return cls(**options)

    def to_mapping(self) -> dict[str, Any]:
        """The options as YAML-able values: the core ones always, the others where not at their default."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in self.ALWAYS_WRITTEN or value != f.default:
                out[f.name] = value
        return out


def generator(opts: UpcycleWeights, layer: int, purpose: str, expert: int = -1) -> torch.Generator:
    """The random stream of one (seed, layer, purpose, expert): independent of every other tensor's."""
    digest = hashlib.sha256(f'{opts.seed}/{layer}/{purpose}/{expert}'.encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], 'little') & (2**63 - 1))


def router_weight(opts: UpcycleWeights, layer: int, d_model: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Layer `layer`'s fresh router [E, D] ~ N(0, std^2). Random, not zero: a zero router scores all experts equally."""
    g = generator(opts, layer, 'router')
    return (torch.randn(opts.num_experts, d_model, generator=g) * opts.router_init_std).to(dtype)


def expert_matrix(dense: torch.Tensor, opts: UpcycleWeights, layer: int, role: str, expert: int) -> torch.Tensor:
    """Expert `expert`'s copy [F, D] of the dense matrix `dense` [F, D] (role 'down': pass down.T).

    A plain copy returns `dense` itself (no new memory); noise (std expert_noise_std * std(dense), drawn per
    expert) and the output scale (role 'down') make a new tensor."""
    assert role in ROLES, role
    assert 0 <= expert < opts.num_experts, (expert, opts.num_experts)
    out = dense
    if opts.expert_noise_std > 0:
        noise = torch.randn(dense.shape, generator=generator(opts, layer, f'noise/{role}', expert))
        out = out + (noise * (opts.expert_noise_std * dense.float().std())).to(dense.dtype)
    if role == 'down' and opts.expert_output_scale != 1.0:
        out = (out.float() * opts.expert_output_scale).to(dense.dtype)
    return out


def expert_tensor(dense: torch.Tensor, opts: UpcycleWeights, layer: int, role: str) -> torch.Tensor:
    """MegaBlocks layout: the E expert matrices of `dense` [F, D] stacked into [E*F, D], filled one at a time."""
    first = expert_matrix(dense, opts, layer, role, 0)
    rows = first.shape[0]
    out = torch.empty(opts.num_experts * rows, *first.shape[1:], dtype=first.dtype)
    out[:rows] = first
    del first
    for e in range(1, opts.num_experts):
        out[e * rows:(e + 1) * rows] = expert_matrix(dense, opts, layer, role, e)
    return out


def expert_copies(weight: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[F, D] -> [E*F, D]: E plain copies (no noise)."""
    return weight.unsqueeze(0).expand(num_experts, *weight.shape).reshape(num_experts * weight.shape[0],
                                                                           *weight.shape[1:]).contiguous()


def expert_spread(w1: torch.Tensor, num_experts: int) -> float:
    """Max abs difference between any expert's slice of an [E*F, D] tensor and expert 0's (0.0: fresh copies)."""
    experts = w1.detach().reshape(num_experts, -1, w1.shape[-1])  # [E, F, D]
    return (experts - experts[:1]).abs().max().item()
