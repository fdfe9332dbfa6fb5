"""The `upcycle:` YAML block: a typed, validated config, and the MoE `ffn_config` it expands to.

Pure Python: imports neither torch nor llmfoundry, so it can be used (and tested) anywhere.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from foundry_upcycle.moe_layers import check_moe_layers, moe_layer_indices

BACKENDS = ('auto', 'torch', 'megablocks')
# renormalized: top-k weights renormalised to sum 1 (Mixtral; exact function preservation).
# softmax: softmax-then-top-k without renormalisation (He et al. 2024), experts' output scaled by E/K.
ROUTER_WEIGHTS = ('renormalized', 'softmax')
DENSE_FFN_TYPES = {'mptglu': 'glu', 'mptmlp': 'mlp'}
MOE_FFN_TYPES = ('torch_dmoe', 'mb_dmoe', 'mb_moe')
# MPT's own default activation (exact GELU). megablocks defaults to tanh-GELU, so we always set it.
DEFAULT_FFN_ACT_FN = {'name': 'gelu', 'approximate': 'none'}


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True)
class UpcycleConfig:
    """The `upcycle:` block. YAML key `from` maps to `source` (``from`` is a Python keyword)."""

    source: Optional[str] = None
    num_experts: int = 8
    top_k: int = 2
    router_init_std: float = 0.02
    seed: int = 0
    load_balancing_loss_weight: float = 0.01
    zloss_weight: float = 0.0
    expert_noise_std: float = 0.0
    backend: str = 'auto'
    moe_world_size: int = 1
    lr: Optional[float] = None  # optimizer.lr of the upcycled run (the paper used 2x CPT's at 436M); None: the recipe's
    router_weights: str = 'renormalized'
    # variants (weights.py states each one's exactness rule)
    drop_ratio: float = 0.0            # Drop-Upcycling: fraction of each expert's intermediate rows re-drawn
    granularity: int = 1               # fine-grained: each copy split into G experts of width F/G, top-(k*G)
    moe_layers: Any = None             # None: every block; n: blocks 0, n, 2n, ...; a list: those blocks
    grow: int = 1                      # an MoE checkpoint at `from`: each expert copied m times, top-(k*m)

    def __post_init__(self):
        def bad(key: str, why: str):
            raise ValueError(f'upcycle.{key}: {why}')

        if self.source is not None and (not isinstance(self.source, str) or not self.source):
            bad('from', f'must be a non-empty path string, got {self.source!r}')
        if not _is_int(self.num_experts) or self.num_experts < 2:
            bad('num_experts', f'must be an integer >= 2, got {self.num_experts!r}')
        if not _is_int(self.top_k) or not 1 <= self.top_k <= self.num_experts:
            bad('top_k', f'must be an integer in [1, num_experts={self.num_experts}], got {self.top_k!r}')
        if not _is_number(self.router_init_std) or not self.router_init_std > 0:
            bad('router_init_std', f'must be > 0 (a zero router breaks routing), got {self.router_init_std!r}')
        if not _is_int(self.seed):
            bad('seed', f'must be an integer, got {self.seed!r}')
        for key in ('load_balancing_loss_weight', 'zloss_weight', 'expert_noise_std'):
            value = getattr(self, key)
            if not _is_number(value) or value < 0:
                bad(key, f'must be a number >= 0, got {value!r}')
        if self.lr is not None and (not _is_number(self.lr) or not self.lr > 0):
            bad('lr', f'must be a number > 0, got {self.lr!r}')
        if self.router_weights not in ROUTER_WEIGHTS:
            bad('router_weights', f'must be one of {ROUTER_WEIGHTS}, got {self.router_weights!r}')
        if self.backend not in BACKENDS:
            bad('backend', f'must be one of {BACKENDS}, got {self.backend!r}')
        if not _is_int(self.moe_world_size) or self.moe_world_size < 1:
            bad('moe_world_size', f'must be an integer >= 1, got {self.moe_world_size!r}')
        if self.num_experts % self.moe_world_size:
            bad('moe_world_size', f'{self.moe_world_size} must divide num_experts={self.num_experts}')
        if not _is_number(self.drop_ratio) or not 0 <= self.drop_ratio <= 1:
            bad('drop_ratio', f'must be a number in [0, 1] (the fraction of each expert re-drawn), got {self.drop_ratio!r}')
        for key in ('granularity', 'grow'):
            if not _is_int(getattr(self, key)) or getattr(self, key) < 1:
                bad(key, f'must be an integer >= 1, got {getattr(self, key)!r}')
        try:
            object.__setattr__(self, 'moe_layers', check_moe_layers(self.moe_layers, 'upcycle.moe_layers'))
        except ValueError as e:
            raise ValueError(str(e)) from None
        if self.grow > 1:
            for key in ('drop_ratio', 'expert_noise_std'):
                if getattr(self, key):
                    bad(key, f'must be 0 with grow={self.grow}: grow copies the trained experts of an MoE '
                        'checkpoint exactly; drop_ratio / noise re-draw copies of a dense FFN')

    @classmethod
    def keys(cls) -> list[str]:
        return ['from' if f.name == 'source' else f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_mapping(cls, block: Optional[Mapping[str, Any]]) -> 'UpcycleConfig':
        if block is None:
            block = {}
        if not isinstance(block, Mapping):
            raise ValueError(f'upcycle: expected a mapping of options, got {type(block).__name__}')
        unknown = sorted(set(block) - set(cls.keys()))
        if unknown:
            raise ValueError(f'upcycle: unknown key(s) {unknown}; allowed keys are {cls.keys()}')
        kwargs = {('source' if k == 'from' else k): v for k, v in block.items()}
        for key in ('router_init_std', 'load_balancing_loss_weight', 'zloss_weight', 'expert_noise_std', 'lr',
                    'drop_ratio'):
            if _is_int(kwargs.get(key)):
                kwargs[key] = float(kwargs[key])
        return cls(**kwargs)

    def to_mapping(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out['from'] = out.pop('source')
        if isinstance(out['moe_layers'], tuple):
            out['moe_layers'] = list(out['moe_layers'])
        return out

    def weights(self):
        """The options of the weight math (`weights.UpcycleWeights`): what the loader and the mappings need."""
        from foundry_upcycle.weights import UpcycleWeights
        return UpcycleWeights(num_experts=self.num_experts, router_init_std=self.router_init_std, seed=self.seed,
                              expert_noise_std=self.expert_noise_std, expert_output_scale=self.expert_output_scale,
                              granularity=self.granularity, drop_ratio=self.drop_ratio, grow=self.grow,
                              moe_layers=self.moe_layers)

    @property
    def exact(self) -> bool:
        """Whether the freshly upcycled model reproduces its source's function (to rounding): plain copies with
        renormalised top-k (any granularity, layer subset), or a grown MoE (renormalised or softmax alike)."""
        copies = self.expert_noise_std == 0 and self.drop_ratio == 0
        return copies and (self.router_weights == 'renormalized' or self.grow > 1)

    @property
    def total_experts(self) -> int:
        """Experts per MoE block of the model: num_experts copies x granularity shards x grow."""
        return self.num_experts * self.granularity * self.grow

    @property
    def total_top_k(self) -> int:
        """Experts per token of the model: top_k x granularity x grow (the same active width as top_k copies,
        times grow)."""
        return self.top_k * self.granularity * self.grow

    @property
    def expert_output_scale(self) -> float:
        """Factor folded into every expert's w2 at upcycle time: E/K for `router_weights: softmax`, else 1.

        With softmax weights p (no renormalisation), a fresh layer computes dense(x) * (E/K) * sum_topk p, and
        K/E <= sum_topk p <= 1, so its output lies between dense(x) and (E/K) dense(x); it equals dense(x)
        when the router is uniform (p = 1/E). With router logits spread Delta = max_e z_e - min_e z_e per token,
        sum_topk p <= K e^Delta / (K e^Delta + E - K), so the relative error is at most
        (E - K)(e^Delta - 1) / (K e^Delta + E - K) (about (1 - K/E) Delta for small Delta)."""
        return self.num_experts / self.top_k if self.router_weights == 'softmax' else 1.0


def dense_ffn_shape(model_cfg: Mapping[str, Any]) -> tuple[str, int]:
    """(mlp_type, ffn_hidden_size) of a dense MPT model config, or ValueError naming the bad key."""
    ffn = model_cfg.get('ffn_config') or {'ffn_type': 'mptmlp'}
    ffn_type = ffn.get('ffn_type', 'mptmlp')
    if ffn_type in MOE_FFN_TYPES:
        raise ValueError(
            f'model.ffn_config.ffn_type is {ffn_type!r}, already a mixture of experts: the upcycle block '
            'expects the dense recipe (mptglu or mptmlp) and expands it itself',
        )
    if ffn_type not in DENSE_FFN_TYPES:
        raise ValueError(
            f'model.ffn_config.ffn_type {ffn_type!r} cannot be upcycled; supported: {sorted(DENSE_FFN_TYPES)}',
        )
    d_model = model_cfg.get('d_model', 2048)
    hidden = ffn.get('ffn_hidden_size')
    if hidden is None:
        ratio = model_cfg.get('expansion_ratio', 4)
        hidden = d_model * ratio
        if int(hidden) != hidden:
            raise ValueError(f'model.d_model * model.expansion_ratio must be an integer, got {hidden}')
    return DENSE_FFN_TYPES[ffn_type], int(hidden)


def check_no_ffn_bias(model_cfg: Mapping[str, Any]) -> None:
    """MoE experts (torch_dmoe, mb_dmoe) hold no biases. MPTBlock derives FFN biases from `no_bias`."""
    if not model_cfg.get('no_bias', False):
        raise ValueError(
            'model.no_bias must be true: the dense FFN then has biases, which bias-free experts '
            '(torch_dmoe / mb_dmoe) cannot hold, so the upcycled model could not reproduce it',
        )


# ffn_config keys the block decides; a dense recipe that sets one of them to another value contradicts it.
_BLOCK_OWNED = {
    'moe_num_experts': lambda c: c.total_experts,
    'moe_top_k': lambda c: c.total_top_k,
    'moe_world_size': lambda c: c.moe_world_size,
    'moe_loss_weight': lambda c: c.load_balancing_loss_weight,
}
_EXACTNESS = {'moe_jitter_eps': None, 'uniform_expert_assignment': False}
_NORMALIZE = {'renormalized': 1, 'softmax': None}  # -> moe_normalize_expert_weights (None: no renormalisation)


def moe_ffn_config(model_cfg: Mapping[str, Any], cfg: UpcycleConfig, backend: str) -> dict[str, Any]:
    """The MoE `ffn_config` that replaces the dense one. backend: 'torch' or 'megablocks'."""
    assert backend in ('torch', 'megablocks'), backend
    check_no_ffn_bias(model_cfg)
    mlp_type, hidden = dense_ffn_shape(model_cfg)
    if hidden % cfg.granularity:
        raise ValueError(f'upcycle.granularity={cfg.granularity} must divide the dense FFN width {hidden} '
                         '(model.ffn_config.ffn_hidden_size, or d_model * expansion_ratio)')
    dense = dict(model_cfg.get('ffn_config') or {})
    for key, want in _BLOCK_OWNED.items():
        if key in dense and dense[key] != want(cfg):
            raise ValueError(
                f'model.ffn_config.{key}={dense[key]!r} contradicts the upcycle block ({want(cfg)!r}); '
                'remove it from ffn_config',
            )
    exactness = {**_EXACTNESS, 'moe_normalize_expert_weights': _NORMALIZE[cfg.router_weights]}
    for key, want in exactness.items():
        if key in dense and dense[key] != want:
            raise ValueError(
                f'model.ffn_config.{key}={dense[key]!r} breaks function preservation (upcycling needs {want!r})',
            )
    out: dict[str, Any] = {
        'ffn_type': 'torch_dmoe' if backend == 'torch' else 'mb_dmoe',
        'ffn_hidden_size': hidden // cfg.granularity,
        'ffn_act_fn': copy.deepcopy(dense.get('ffn_act_fn') or DEFAULT_FFN_ACT_FN),
        'mlp_type': mlp_type,
        'moe_num_experts': cfg.total_experts,
        'moe_top_k': cfg.total_top_k,
        **exactness,
    }
    if backend == 'megablocks':
        out.pop('uniform_expert_assignment')
        out.update(
            moe_world_size=cfg.moe_world_size,
            mlp_impl='grouped',
            moe_loss_weight=cfg.load_balancing_loss_weight,
        )
    elif cfg.moe_world_size != 1:
        raise ValueError('upcycle.moe_world_size > 1 (expert parallelism) needs the megablocks backend')
    return out


def moe_model_fields(model_cfg: Mapping[str, Any], cfg: UpcycleConfig, backend: str) -> dict[str, Any]:
    """The `model:` keys the block sets: the MoE `ffn_config`, and with `moe_layers` on some blocks only, the list
    of MoE blocks (`moe_layers`) and the dense FFN the others keep (`dense_ffn_config`), which
    `mpt_upcycle_causal_lm` builds; `expert_granularity` (and `expert_grow`) for G > 1 let the router monitor tell
    which shard of the dense FFN each expert holds."""
    out: dict[str, Any] = {'ffn_config': moe_ffn_config(model_cfg, cfg, backend)}
    n_layers = model_cfg.get('n_layers', 24)      # MPTConfig's default
    moe = moe_layer_indices(cfg.moe_layers, n_layers, 'upcycle.moe_layers')
    if len(moe) < n_layers:
        out['moe_layers'] = moe
        out['dense_ffn_config'] = copy.deepcopy(dict(model_cfg.get('ffn_config') or {'ffn_type': 'mptmlp'}))
    if cfg.granularity > 1:
        out['expert_granularity'] = cfg.granularity
        if cfg.grow > 1:
            out['expert_grow'] = cfg.grow
    return out
