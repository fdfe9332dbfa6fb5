"""The study's typed config: what to train, at which budgets, on what data, how to evaluate and benchmark.

Built from a YAML file (`--config study.yaml`) and/or command-line flags; every key is validated at construction
and an unknown key is a ValueError naming it. Pure Python (imports neither torch nor llmfoundry), so bad input
is refused before anything heavy is imported or trained. `check_paths` does the file-system checks (data and eval
folders exist, the output folder is writable) and also runs before any training.

Example study.yaml (the CLI flags override it):

    scale: tiny
    budgets: [0.1, 0.2, 0.4]
    seed: 17
    seeds: 3                                  # phase-2 seeds at the largest budget (seeds_other elsewhere)
    pretrain_steps: 850                       # or pretrain_tokens_per_param: [64] (a list: one study per base)
    lr_sweep: [5.0e-4, 1.0e-3, 2.0e-3]        # each arm's lr grid at the smallest budget, on validation
    model: {d_model: 64, n_layers: 2}        # overrides of every recipe's `model:` block
    upcycle: {num_experts: 4}                # overrides of the upcycling recipe's `upcycle:` block
    data: {generic_dir: my/prose, domain_dir: my/code, vocab_size: 1024}
    eval: {local_data: path/to/local_data, tasks: [copa, piqa], max_examples_per_task: 20}
    inference: {skip: true}
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from foundry_upcycle.study import arms as arm_registry
from foundry_upcycle.study.data_config import DataConfig
from foundry_upcycle.study.eval_config import EvalConfig, InferenceConfig, shipped_eval_data
from foundry_upcycle.study.presets import PRESETS
from foundry_upcycle.study.validators import (MAX_BUDGET, _is_int, _is_number, _mapping, _path_or_none,
                                              _positive_int, _reject_unknown, parse_budgets, parse_numbers)

SCALES = ('tiny', '436m', '1.4b')
PAPER_BUDGETS = (0.1, 0.2, 0.4, 0.8, 1.0)
# The paper's budgets that fit the 20-minute CPU default with 3 seeds at the largest (docs/study_design.md).
DEFAULT_BUDGETS = (0.1, 0.2, 0.4)
# 850 steps x 32 x 128 tokens = 3.48M tokens for the 54,432-parameter default base: 64 tokens per parameter.
DEFAULT_PRETRAIN_STEPS = 850
DEFAULT_SEEDS = 3
DEFAULT_SEEDS_OTHER = 3
# Each arm's phase-2 lr grid (study/lr_select.py: extended past an edge optimum), x2 steps from the recipes' 2.8e-3.
# 1.4e-3 was dropped after the default's validation sweep put it 0.04-0.05 nats behind 2.8e-3 for both arms.
DEFAULT_LR_GRID = (2.8e-3, 5.6e-3, 1.12e-2, 2.24e-2)
# A real base (hf_base): around the paper's lrs (CPT 5e-5, upcycling 1e-4 at 436M), x2 steps.
HF_LR_GRID = (2.5e-5, 5e-5, 1e-4, 2e-4)
LR_CHECKS = ('up', 'both', 'off')
# One torch thread: results do not depend on the machine's core count, and on a shared machine one thread ran these
# tiny models ~3x faster than two (busy-waiting OpenMP threads); its CPU time per step is the idle wall time.
DEFAULT_THREADS = 1
ROUTER_WEIGHTS = ('renormalized', 'softmax')
REPO = Path(__file__).resolve().parents[2]
__all__ = ['StudyConfig', 'EvalConfig', 'InferenceConfig', 'DataConfig', 'PRESETS', 'MAX_BUDGET', 'REPO',
           'check_paths', 'check_writable', 'merge', 'parse_budgets', 'parse_numbers', 'shipped_eval_data']


_NESTED = {'data': DataConfig, 'eval': EvalConfig, 'inference': InferenceConfig}


@dataclass(frozen=True)
class StudyConfig:
    """Everything the study does. Paths are kept as given; `out` and `progress` do not change any result."""
    out: str = 'runs/default'
    scale: str = 'tiny'
    budgets: tuple[float, ...] = DEFAULT_BUDGETS
    seed: int = 17                                # dense base seed; phase-2 seed i trains with seed + i
    seeds: int = DEFAULT_SEEDS                    # phase-2 seeds (data order + router init) at the largest budget
    seeds_other: int = DEFAULT_SEEDS_OTHER        # ... and at every other budget
    arms: tuple[str, ...] = arm_registry.DEFAULT_ARMS   # phase-2 arms (study/arms.py); the first is the baseline
    # dense base: pretrained here (tiny), or given (dense_checkpoint + the tokens it was pretrained on)
    pretrain_steps: Optional[int] = None          # None: DEFAULT_PRETRAIN_STEPS, or from pretrain_tokens_per_param
    pretrain_tokens_per_param: tuple[float, ...] = ()   # one value: the base's length; several: one study each
    # phase-2 lr grid tried at the smallest budget (seed 0), each arm's best on validation; None: DEFAULT_LR_GRID
    # unless lr / upcycle_lr are given; (): no sweep (the recipes' lrs)
    lr_sweep: Optional[tuple[float, ...]] = None
    lr_extend: int = 2                            # grid steps added past an edge optimum, per arm
    lr_check: str = 'up'                          # check the choice at the largest budget (seed 0) at its grid
                                                  # neighbour above ('up'), both neighbours ('both'), or 'off'
    dense_checkpoint: Optional[str] = None
    pretrain_tokens: Optional[int] = None
    # a real dense base instead: a Hugging Face Llama / Mistral directory, trained with yamls/hf (hf_causal_lm) on
    # the built-in data (or data.*_dir) tokenized with its own tokenizer; pretrain_tokens: what it was trained on
    hf_base: Optional[str] = None
    # training settings shared by all runs; None keeps the recipe's value
    global_batch_size: Optional[int] = None
    max_seq_len: Optional[int] = None
    warmup_fraction: float = 0.1                  # of each CPT / upcycling run's steps (a fresh warmup)
    lr: Optional[float] = None                    # CPT and upcycling (upcycle.lr, if set, wins for upcycling)
    upcycle_lr: Optional[float] = None            # upcycling only (sets upcycle.lr)
    pretrain_lr: Optional[float] = None
    model: Mapping[str, Any] = field(default_factory=dict)      # merged into every recipe's model block
    upcycle: Mapping[str, Any] = field(default_factory=dict)    # merged into the upcycle block
    train_overrides: tuple[str, ...] = ()          # foundry dotlist (key=value) applied to every training run
    recipes: Mapping[str, str] = field(default_factory=dict)    # pretrain / cpt / upcycle YAML; default yamls/<scale>
    # data: built-in or text folders (tiny); a user's MDS folders (436m, 1.4b)
    data: DataConfig = field(default_factory=DataConfig)
    mds_dir: Optional[str] = None                 # domain mix, MDS with train/ and val/
    generic_mds_dir: Optional[str] = None         # optional: generic MDS with val/ (held-out generic CE)
    tokenizer: Optional[str] = None               # a Hugging Face tokenizer folder
    eval: EvalConfig = field(default_factory=EvalConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    nproc: Optional[int] = None                   # processes per training run; None: visible GPUs, else 1
    threads: Optional[int] = DEFAULT_THREADS      # torch CPU threads (fixed for reproducibility); None: torch's
    jobs: Optional[int] = None                    # phase-2 runs at once (tiny, CPU); None: one per free core
    timing: bool = True                           # interleaved, warmed-up step-time measurement of both arms
    progress: bool = True

    def __post_init__(self):
        if self.scale not in SCALES:
            raise ValueError(f'scale: {self.scale!r} is not one of {list(SCALES)}')
        object.__setattr__(self, 'out', _path_or_none(self.out, 'out'))
        object.__setattr__(self, 'budgets', parse_budgets(self.budgets))
        if not _is_int(self.seed):
            raise ValueError(f'seed must be an integer, got {self.seed!r}')
        _positive_int(self.pretrain_steps, 'pretrain_steps', optional=True)
        _positive_int(self.seeds, 'seeds')
        _positive_int(self.seeds_other, 'seeds_other')
        self._check_arms()
        for key in ('pretrain_tokens_per_param', 'lr_sweep'):
            value = getattr(self, key)
            if value is None:
                continue
            value = parse_numbers(value, key) if isinstance(value, str) else tuple(value or ())
            if any(not _is_number(v) or v <= 0 for v in value) or len(set(value)) != len(value):
                raise ValueError(f'{key} must be distinct numbers > 0, got {list(value)}')
            object.__setattr__(self, key, tuple(float(v) for v in value))
        if self.pretrain_steps is not None and self.pretrain_tokens_per_param:
            raise ValueError('give pretrain_steps or pretrain_tokens_per_param, not both')
        if self.lr_sweep is not None and len(self.lr_sweep) == 1:
            raise ValueError('lr_sweep: give at least two learning rates (or set lr / upcycle_lr directly)')
        if not _is_int(self.lr_extend) or self.lr_extend < 0:
            raise ValueError(f'lr_extend must be an integer >= 0, got {self.lr_extend!r}')
        if self.upcycle.get('router_weights') is not None and self.upcycle['router_weights'] not in ROUTER_WEIGHTS:
            raise ValueError(f'upcycle.router_weights: {self.upcycle["router_weights"]!r} is not one of '
                             f'{list(ROUTER_WEIGHTS)}')
        _positive_int(self.pretrain_tokens, 'pretrain_tokens', optional=True)
        for key in ('global_batch_size', 'max_seq_len', 'nproc', 'threads', 'jobs'):
            _positive_int(getattr(self, key), key, optional=True)
        if not _is_number(self.warmup_fraction) or not 0 <= self.warmup_fraction < 1:
            raise ValueError(f'warmup_fraction must be a number in [0, 1), got {self.warmup_fraction!r}')
        for key in ('lr', 'pretrain_lr', 'upcycle_lr'):
            value = getattr(self, key)
            if value is not None and (not _is_number(value) or value <= 0):
                raise ValueError(f'{key} must be a number > 0, got {value!r}')
        for key in ('model', 'upcycle'):
            object.__setattr__(self, key, _mapping(getattr(self, key), key))
        recipes = _mapping(self.recipes, 'recipes')
        _reject_unknown(recipes, ('pretrain', 'cpt', 'upcycle'), 'recipes')
        object.__setattr__(self, 'recipes', {k: _path_or_none(v, f'recipes.{k}') for k, v in recipes.items()})
        if isinstance(self.train_overrides, str) or not all(
                isinstance(o, str) and '=' in o for o in self.train_overrides):
            raise ValueError(f'train_overrides must be a list of key=value strings, got {self.train_overrides!r}')
        object.__setattr__(self, 'train_overrides', tuple(self.train_overrides))
        for key in ('dense_checkpoint', 'mds_dir', 'generic_mds_dir', 'tokenizer', 'hf_base'):
            object.__setattr__(self, key, _path_or_none(getattr(self, key), key))
        for key, cls in _NESTED.items():
            if not isinstance(getattr(self, key), cls):
                raise ValueError(f'{key} must be a {cls.__name__}')
        if self.scale == 'tiny' and self.max_seq_len is not None and self.data.max_seq_len != self.max_seq_len:
            object.__setattr__(self, 'data', dataclasses.replace(self.data, max_seq_len=self.max_seq_len))
        if self.lr_check not in LR_CHECKS:
            raise ValueError(f'lr_check: {self.lr_check!r} is not one of {list(LR_CHECKS)}')
        for key in ('progress', 'timing'):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f'{key} must be true or false, got {getattr(self, key)!r}')
        self._check_scale()

    def _check_arms(self) -> None:
        value = self.arms.split(',') if isinstance(self.arms, str) else self.arms
        if not isinstance(value, (list, tuple)) or not all(isinstance(a, str) for a in value):
            raise ValueError(f'arms must be a list of arm names, got {self.arms!r}')
        value = tuple(a.strip() for a in value)
        for name in value:
            arm_registry.get(name)            # ValueError naming the unknown arm
        if len(set(value)) != len(value) or len(value) < 2 or value[0] != arm_registry.BASELINE:
            raise ValueError(f'arms must start with the baseline {arm_registry.BASELINE!r} and name at least one '
                             f'other arm, each once; got {list(value)}')
        object.__setattr__(self, 'arms', value)

    def _check_scale(self) -> None:
        if self.hf_base is not None:
            self._check_hf_base()
            return
        if (self.dense_checkpoint is None) != (self.pretrain_tokens is None):
            raise ValueError('dense_checkpoint and pretrain_tokens go together: the budgets are fractions of the '
                             'FLOPs the given dense checkpoint was pretrained with')
        if self.dense_checkpoint is not None and (self.pretrain_steps or self.pretrain_tokens_per_param):
            raise ValueError('pretrain_steps / pretrain_tokens_per_param are for a base pretrained here; a given '
                             'dense_checkpoint comes with pretrain_tokens')
        if self.scale == 'tiny':
            for key in ('mds_dir', 'generic_mds_dir', 'tokenizer'):
                if getattr(self, key) is not None:
                    raise ValueError(f'{key} is for --scale 436m / 1.4b (a user\'s MDS data); the tiny study '
                                     'builds its own (use data.generic_dir / data.domain_dir for your text)')
            return
        missing = [k for k in ('mds_dir', 'tokenizer', 'dense_checkpoint') if getattr(self, k) is None]
        if missing:
            raise ValueError(f'scale {self.scale}: {missing} must be given (your MDS data with train/ and val/, '
                             'a Hugging Face tokenizer folder, and the dense checkpoint with pretrain_tokens)')
        if self.data != DataConfig():
            raise ValueError(f'data: the built-in data settings are for the tiny scale; scale {self.scale} reads '
                             'mds_dir')
        if 'pretrain' in self.recipes:
            raise ValueError(f'recipes.pretrain: scale {self.scale} starts from dense_checkpoint, it does not pretrain')

    def _check_hf_base(self) -> None:
        clash = [k for k in ('dense_checkpoint', 'pretrain_steps', 'mds_dir', 'generic_mds_dir', 'tokenizer')
                 if getattr(self, k) is not None] + (['pretrain_tokens_per_param'] if self.pretrain_tokens_per_param
                                                      else []) + (['recipes.pretrain'] if 'pretrain' in self.recipes
                                                                  else [])
        if clash:
            raise ValueError(f'hf_base: {clash} do not apply; the base is the given model (not pretrained here), '
                             'the data the built-in mix (or data.generic_dir / data.domain_dir) in its own tokenizer')
        if self.scale != 'tiny':
            raise ValueError(f'hf_base: scale {self.scale} does not apply (the model is the shape); drop --scale')
        if self.pretrain_tokens is None:
            raise ValueError('hf_base needs pretrain_tokens: the tokens the model was pretrained on (its model card; '
                             'e.g. 2e12 for SmolLM2-135M); the budgets are fractions of those FLOPs')
        if self.data.tokenizer not in (None, self.hf_base):
            raise ValueError(f'data.tokenizer ({self.data.tokenizer}): with hf_base the data is tokenized with the '
                             'model\'s own tokenizer; drop data.tokenizer')
        object.__setattr__(self, 'data', dataclasses.replace(self.data, tokenizer=self.hf_base))

    # ------------------------------------------------------------------ construction

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_mapping(cls, block: Optional[Mapping[str, Any]]) -> 'StudyConfig':
        block = _mapping(block, 'study config')
        _reject_unknown(block, cls.keys(), 'study config')
        kwargs = dict(block)
        if 'data' in kwargs:
            kwargs['data'] = DataConfig.from_mapping(_mapping(kwargs['data'], 'data'))
        for key, sub in (('eval', EvalConfig), ('inference', InferenceConfig)):
            if key in kwargs:
                sub_block = _mapping(kwargs[key], key)
                _reject_unknown(sub_block, [f.name for f in dataclasses.fields(sub)], key)
                kwargs[key] = sub(**sub_block)
        if 'train_overrides' in kwargs and isinstance(kwargs['train_overrides'], list):
            kwargs['train_overrides'] = tuple(kwargs['train_overrides'])
        for key in ('warmup_fraction', 'lr', 'pretrain_lr', 'upcycle_lr'):
            if _is_int(kwargs.get(key)):
                kwargs[key] = float(kwargs[key])
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, path: str, overrides: Optional[Mapping[str, Any]] = None,
                  base: Optional[Mapping[str, Any]] = None) -> 'StudyConfig':
        """The config in a YAML file over `base` (a preset), with `overrides` (top-level keys; nested mappings
        merged) on top."""
        p = Path(path).expanduser()
        if not p.is_file():
            raise ValueError(f'--config: {path} is not a file')
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException
        try:
            block = OmegaConf.to_container(OmegaConf.load(p), resolve=True)
        except (OmegaConfBaseException, OSError, ValueError) as e:
            raise ValueError(f'--config: {path} is not a readable YAML file ({e})') from None
        if not isinstance(block, dict):
            raise ValueError(f'--config: {path} must hold a mapping of study settings')
        return cls.from_mapping(merge(merge(base or {}, block), overrides or {}))

    def replace(self, **changes: Any) -> 'StudyConfig':
        return dataclasses.replace(self, **changes)

    def to_mapping(self) -> dict[str, Any]:
        """Plain data (JSON-able); without `out`, `progress` and `jobs`, which change no result."""
        out = dataclasses.asdict(self)
        out['data'] = self.data.to_mapping()
        for key in ('out', 'progress', 'jobs'):
            out.pop(key)
        return _plain(out)

    # ------------------------------------------------------------------ derived

    def recipe_path(self, kind: str) -> Path:
        if kind in self.recipes:
            return Path(self.recipes[kind]).expanduser()
        return REPO / 'yamls' / ('hf' if self.hf_base else self.scale) / f'{kind}.yaml'

    @property
    def pretrains(self) -> bool:
        return self.dense_checkpoint is None and self.hf_base is None

    @property
    def regimes(self) -> tuple[float, ...]:
        """Several pretraining lengths (tokens per parameter): one sub-study each; () for a single study."""
        return self.pretrain_tokens_per_param if len(self.pretrain_tokens_per_param) > 1 else ()

    @property
    def lr_grid(self) -> tuple[float, ...]:
        """The lr grid the study sweeps: lr_sweep; else, for the tiny study, the default unless lr / upcycle_lr fix the
        lrs (a paper-scale study trains at its recipes' lrs, the paper's, unless given a grid); () none."""
        if self.lr_sweep is not None:
            return self.lr_sweep
        if self.lr or self.upcycle_lr or self.scale != 'tiny':
            return ()
        return HF_LR_GRID if self.hf_base else DEFAULT_LR_GRID

    def seeds_at(self, budget: float) -> int:
        return self.seeds if budget == max(self.budgets) else self.seeds_other


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """base with overrides on top; nested mappings merge key by key."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _plain(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, os.PathLike):
        return str(x)
    return x


def check_paths(cfg: StudyConfig) -> None:
    """File-system checks before any training: inputs exist, the output folder is writable (ValueError)."""
    from foundry_upcycle.study.data import validate_sources
    if cfg.scale == 'tiny':
        validate_sources(cfg.data)
    else:
        for key in ('mds_dir', 'generic_mds_dir'):
            root = getattr(cfg, key)
            splits = ('train', 'val') if key == 'mds_dir' else ('val',)
            for split in splits if root else ():
                if not (Path(root) / split / 'index.json').is_file():
                    raise ValueError(f'{key}: {root} has no MDS split {split}/ (no {split}/index.json)')
        if not (Path(cfg.tokenizer) / 'tokenizer_config.json').is_file():
            raise ValueError(f'tokenizer: {cfg.tokenizer} is not a Hugging Face tokenizer folder '
                             '(no tokenizer_config.json; save yours with tokenizer.save_pretrained(folder))')
    if cfg.hf_base is not None:
        base = Path(cfg.hf_base).expanduser()
        for name in ('config.json', 'tokenizer_config.json'):
            if not (base / name).is_file():
                raise ValueError(f'hf_base: {cfg.hf_base} is not a Hugging Face model directory with its tokenizer '
                                 f'(no {name}); `foundry-upcycle gguf-to-hf` or save_pretrained writes one')
    if cfg.dense_checkpoint is not None:
        from foundry_upcycle.checkpoint_io import require_readable_file
        require_readable_file(cfg.dense_checkpoint, 'dense_checkpoint')
    for kind in (('pretrain',) if cfg.pretrains else ()) + ('cpt', 'upcycle'):
        if not cfg.recipe_path(kind).is_file():
            raise ValueError(f'recipes.{kind}: {cfg.recipe_path(kind)} does not exist')
    local = cfg.eval.local_data
    if local not in ('auto', None) and not Path(local).is_dir():
        raise ValueError(f'eval.local_data: {local} is not a directory; pass a checkout of llm-foundry\'s '
                         'scripts/eval/local_data, or none for cross-entropy only')
    check_writable(cfg.out)


def check_writable(out: str) -> None:
    p = Path(out).expanduser()
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix='.write-test-'):
            pass
    except OSError as e:
        raise ValueError(f'out: {out} is not a writable directory ({e.strerror or e})') from None
