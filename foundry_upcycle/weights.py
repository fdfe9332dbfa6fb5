"""The weight math of upcycling: one expert matrix or one router from the dense weights. Imports only torch.

Every output is a pure function of (dense tensor, layer index, options): each has its own random stream, seeded
by (seed, layer, purpose[, expert]), so any tensor can be produced alone, in any order, on any rank, and comes out
the same. The mappings (`upcycle.py` for MPT, `llama_to_mixtral.py` for Hugging Face) call these functions per
tensor; the disk writer and the in-training loader consume the mappings' jobs.

Shapes: D d_model, F ffn_hidden_size, E num_experts (copies), G granularity, f = F/G expert width,
N = E*G experts per MoE layer (times m for a grown MoE). Expert matrices are handled in [f, D] orientation:
  gate [f, D], up [f, D], down.T [f, D]   (roles 'gate', 'up', 'down')
so MegaBlocks' `w1`/`v1`/`w2` [N*f, D] are N of them stacked, and Mixtral's per-expert w1/w3 [f, D] are one each
(its w2 [D, f] is the transpose of the 'down' one). Expert j = e*G + g is shard g (rows g*f..(g+1)*f) of copy e.

The variants (all exactness claims are to rounding, fp32):
  granularity G   E*G experts of width F/G routed top-(k*G); the G shards of copy e share one router row (a virtual
                  group), so top-(k*G) picks k whole copies and each shard gets p_e/(G*sum p) (renormalised) or p_e/G
                  (softmax): scaling ONLY the down projection by G (renormalised) or E*G/k (softmax, times the
                  usual E/k rule) makes the fresh model exact (renormalised). The activation sees unscaled inputs.
  drop_ratio r    Drop-Upcycling (Nakamura et al. 2025): each expert re-draws floor(r*f) of its intermediate
                  indices (a different random subset per expert, the same subset for gate, up and down) from
                  N(mean, std) of the whole dense matrix. Not function-preserving, on purpose.
  grow m          an MoE source: each expert and its router row copied m times (expert j <- source expert j // m),
                  top-k times m: exact with NO weight scaling, for renormalised and softmax weights alike (each
                  copy gets p_e/m of its source's weight and the m copies add up to p_e).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from foundry_upcycle.moe_layers import MoeLayers, _is_int, check_moe_layers

ROLES = ('gate', 'up', 'down')


@dataclass(frozen=True)
class UpcycleWeights:
    """What the weight math needs from the `upcycle:` block (`config.UpcycleConfig.weights()` builds it).

    expert_output_scale multiplies every expert's down projection (E/K for softmax router weights without
    renormalisation; see `config.UpcycleConfig.expert_output_scale`); granularity G multiplies it by G on top."""

    num_experts: int
    router_init_std: float = 0.02
    seed: int = 0
    expert_noise_std: float = 0.0
    expert_output_scale: float = 1.0
    granularity: int = 1
    drop_ratio: float = 0.0
    grow: int = 1
    moe_layers: MoeLayers = None

    # Written to the loader callback's YAML entry always; other fields only when they differ from their default.
    ALWAYS_WRITTEN = ('num_experts', 'router_init_std', 'seed', 'expert_noise_std')

    def __post_init__(self):
        if not _is_int(self.num_experts) or self.num_experts < 2:
            raise ValueError(f'num_experts must be an integer >= 2, got {self.num_experts!r}')
        if not self.router_init_std > 0:
            raise ValueError(f'router_init_std must be > 0 (a zero router breaks routing), got {self.router_init_std}')
        if self.expert_noise_std < 0:
            raise ValueError(f'expert_noise_std must be >= 0, got {self.expert_noise_std}')
        for key in ('granularity', 'grow'):
            if not _is_int(getattr(self, key)) or getattr(self, key) < 1:
                raise ValueError(f'{key} must be an integer >= 1, got {getattr(self, key)!r}')
        if not 0 <= self.drop_ratio <= 1:
            raise ValueError(f'drop_ratio must be in [0, 1], got {self.drop_ratio!r}')
        if self.grow > 1 and (self.drop_ratio or self.expert_noise_std):
            raise ValueError('grow copies a trained MoE exactly; drop_ratio and expert_noise_std apply to copies of a '
                             'dense FFN and must be 0 with grow > 1')
        object.__setattr__(self, 'moe_layers', check_moe_layers(self.moe_layers))

    @property
    def experts(self) -> int:
        """Experts per MoE layer of the model: E copies x G shards (x m when grown)."""
        return self.num_experts * self.granularity * self.grow

    @property
    def copies_only(self) -> bool:
        """Whether every expert starts as an exact copy (of a dense shard, or of a source expert)."""
        return self.drop_ratio == 0 and self.expert_noise_std == 0

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
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def generator(opts: UpcycleWeights, layer: int, purpose: str, expert: int = -1) -> torch.Generator:
    """The random stream of one (seed, layer, purpose, expert): independent of every other tensor's."""
    digest = hashlib.sha256(f'{opts.seed}/{layer}/{purpose}/{expert}'.encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], 'little') & (2**63 - 1))


def router_weight(opts: UpcycleWeights, layer: int, d_model: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Layer `layer`'s fresh router [E*G, D]: E rows ~ N(0, std^2), each repeated for the G shards of its copy (a
    virtual group). Random, not zero: a zero router scores all experts equally."""
    g = generator(opts, layer, 'router')
    rows = torch.randn(opts.num_experts, d_model, generator=g) * opts.router_init_std
    return rows.repeat_interleave(opts.granularity, dim=0).to(dtype)


def dropped_rows(opts: UpcycleWeights, layer: int, expert: int, rows: int) -> torch.Tensor:
    """The floor(drop_ratio * rows) intermediate indices expert `expert` re-draws (shared by its gate, up, down)."""
    n = math.floor(opts.drop_ratio * rows + 1e-9)
    return torch.randperm(rows, generator=generator(opts, layer, 'drop', expert))[:n]


def expert_matrix(dense: torch.Tensor, opts: UpcycleWeights, layer: int, role: str, expert: int) -> torch.Tensor:
    """Expert `expert`'s matrix [F/G, D] from the dense matrix `dense` [F, D] (role 'down': pass down.T).

    A plain copy returns `dense` (or its row shard) itself (no new memory); noise (std expert_noise_std *
    std(dense), per expert), Drop-Upcycling's re-drawn rows and the output scale (role 'down') make a new tensor."""
    assert role in ROLES, role
    assert 0 <= expert < opts.num_experts * opts.granularity, (expert, opts.num_experts, opts.granularity)
    rows, rem = divmod(dense.shape[0], opts.granularity)
    assert rem == 0, f'granularity {opts.granularity} does not divide {dense.shape[0]}'
    shard = expert % opts.granularity
    out = dense[shard * rows:(shard + 1) * rows]
    if opts.expert_noise_std > 0:
        noise = torch.randn(out.shape, generator=generator(opts, layer, f'noise/{role}', expert))
        out = out + (noise * (opts.expert_noise_std * dense.float().std())).to(dense.dtype)
    if opts.drop_ratio > 0:
        idx = dropped_rows(opts, layer, expert, rows)
        mean, std = dense.float().mean(), dense.float().std()
        redrawn = torch.randn(len(idx), dense.shape[1], generator=generator(opts, layer, f'drop/{role}', expert))
        out = out.clone()
        out[idx] = (redrawn * std + mean).to(dense.dtype)
    scale = opts.expert_output_scale * opts.granularity
    if role == 'down' and scale != 1.0:
        out = (out.float() * scale).to(dense.dtype)
    return out


def expert_tensor(dense: torch.Tensor, opts: UpcycleWeights, layer: int, role: str) -> torch.Tensor:
    """MegaBlocks layout: the E*G expert matrices of `dense` [F, D] stacked into [E*F, D], filled one at a time
    (so with G > 1 the same rows as E plain copies, each shard in its own expert)."""
    first = expert_matrix(dense, opts, layer, role, 0)
    rows = first.shape[0]
    n = opts.num_experts * opts.granularity
    out = torch.empty(n * rows, *first.shape[1:], dtype=first.dtype)
    out[:rows] = first
    del first
    for e in range(1, n):
        out[e * rows:(e + 1) * rows] = expert_matrix(dense, opts, layer, role, e)
    return out


def grown_rows(tensor: torch.Tensor, source_experts: int, grow: int) -> torch.Tensor:
    """Grow: [N*r, ...] (N experts of r rows each, e.g. a router [N, D] or w1 [N*f, D]) -> [N*m*r, ...], each
    expert's rows repeated m times in a row (new expert j is source expert j // m)."""
    rows = tensor.shape[0] // source_experts
    assert rows * source_experts == tensor.shape[0], (tuple(tensor.shape), source_experts)
    blocks = tensor.reshape(source_experts, rows, *tensor.shape[1:])
    return blocks.repeat_interleave(grow, dim=0).reshape(source_experts * grow * rows, *tensor.shape[1:])


def expert_copies(weight: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[F, D] -> [E*F, D]: E plain copies (no noise)."""
    return weight.unsqueeze(0).expand(num_experts, *weight.shape).reshape(num_experts * weight.shape[0],
                                                                           *weight.shape[1:]).contiguous()


def expert_spread(w1: torch.Tensor, num_experts: int) -> float:
    """Max abs difference between any expert's slice of an [E*F, D] tensor and expert 0's (0.0: fresh copies)."""
    experts = w1.detach().reshape(num_experts, -1, w1.shape[-1])  # [E, F, D]
    return (experts - experts[:1]).abs().max().item()


def copy_spread(w1: torch.Tensor, opts: UpcycleWeights) -> float:
    """Max abs difference between experts that start as copies of one matrix (0.0: freshly loaded). w1: [N*f, D]
    with N = E*G*m: grown, the m copies of each source expert; upcycled, the E copies of each shard g."""
    x = w1.detach().reshape(opts.num_experts, opts.granularity, opts.grow, -1)   # [E, G, m, f*D]
    ref = x[:, :, :1] if opts.grow > 1 else x[:1]
    return (x - ref).abs().max().item()
