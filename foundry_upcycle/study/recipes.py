"""A training run of the study as data (recipe kind, hashed settings, unhashed paths), how the study sets one up
(`RunBuilder`: its variables, data paths, seeds, warm-up, lr, monitors) and its resolved foundry config."""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from foundry_upcycle.study import arms
from foundry_upcycle.study.config import StudyConfig

ROUTER_POINTS = 50               # router metrics logged about this many times per upcycled run


@dataclass(frozen=True)
class RunSpec:
    """One training run: a recipe, its variables and study-level settings; paths are kept apart from the hash."""
    kind: str                                  # recipe: pretrain | cpt | upcycle
    settings: dict[str, Any]                   # hashed: variables and top-level keys that change the result
    paths: dict[str, Any] = field(default_factory=dict)   # not hashed: where things are
    display: dict[str, Any] = field(default_factory=dict)  # not hashed: console output only


def build_recipe(cfg: StudyConfig, spec: RunSpec, placeholders: bool = False) -> dict[str, Any]:
    """The resolved foundry config of a run (with `<name>` placeholders for paths when hashing)."""
    from omegaconf import OmegaConf as om
    from omegaconf.errors import OmegaConfBaseException
    path = cfg.recipe_path(spec.kind)
    try:
        base = om.load(path)
        variables = dict(spec.settings.get('variables', {}))
        paths = dict(spec.paths.get('variables', {}))
        variables.update({k: f'<{k}>' for k in paths} if placeholders else paths)
        have = set((om.to_container(base, resolve=False) or {}).get('variables') or {})
        missing = sorted(set(variables) - have)
        if missing:
            raise ValueError(f'recipes.{spec.kind}: {path} has no variables {missing}; the study sets them')
        layers = [{'variables': variables}, spec.settings.get('top', {}), {} if placeholders else spec.display]
        if cfg.model:
            layers.append({'model': dict(cfg.model)})
        if spec.kind == 'upcycle' and cfg.upcycle:
            layers.append({'upcycle': dict(cfg.upcycle)})
        if spec.kind == 'upcycle' and spec.settings.get('upcycle'):
            layers.append({'upcycle': dict(spec.settings['upcycle'])})   # per-run: seed, lr (after the user's)
        merged = om.merge(base, *[om.create(layer) for layer in layers if layer])
        if cfg.train_overrides:
            merged = om.merge(merged, om.from_dotlist(list(cfg.train_overrides)))
        out = om.to_container(merged, resolve=True)
    except OmegaConfBaseException as e:
        raise ValueError(f'recipes.{spec.kind}: {path}: {e}') from None
    if spec.kind == 'upcycle' and 'upcycle' not in out:
        raise ValueError(f'recipes.upcycle: {path} has no `upcycle:` block')
    if spec.kind != 'upcycle' and 'upcycle' in out:
        raise ValueError(f'recipes.{spec.kind}: {path} has an `upcycle:` block; only the upcycling recipe may')
    return out


def moe_model_config(dense_model: Mapping[str, Any], upcycle_block: Mapping[str, Any]) -> dict[str, Any]:
    """The MoE model block the upcycle block turns `dense_model` into (for FLOPs and validation; torch backend)."""
    from foundry_upcycle.config import UpcycleConfig, moe_model_fields
    model = copy.deepcopy(dict(dense_model))
    model.update(moe_model_fields(model, UpcycleConfig.from_mapping(upcycle_block), 'torch'))
    return model


def shipped_models(scale: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(dense, upcycled) model blocks of the shipped CPT / upcycling recipes of a scale (yamls/<scale>)."""
    from omegaconf import OmegaConf as om
    from foundry_upcycle.study.config import REPO
    blocks = {}
    for kind in ('cpt', 'upcycle'):
        raw = om.load(REPO / 'yamls' / scale / f'{kind}.yaml')
        required = {k: f'<{k}>' for k, v in om.to_container(raw.variables, resolve=False).items() if v == '???'}
        blocks[kind] = om.to_container(om.merge(raw, {'variables': required}), resolve=True)
    dense = blocks['cpt']['model']
    block = {k: v for k, v in blocks['upcycle']['upcycle'].items() if k != 'from'}
    return dense, moe_model_config(blocks['upcycle']['model'], block)


def warmup(steps: int, fraction: float) -> str:
    """A fresh linear warm-up over `fraction` of a run's steps (at least one step), as a foundry duration."""
    return f'{max(1, round(fraction * steps)) if fraction > 0 else 0}ba'


def run_lr(run: Mapping[str, Any]) -> float:
    """The learning rate a resolved run trains with (the upcycle block's `lr` wins for upcycling)."""
    block = run.get('upcycle') or {}
    return float(block['lr'] if block.get('lr') is not None else run['optimizer']['lr'])


class RunBuilder:
    """The RunSpec of each run of a study: `spec(what, ...)` with `what` 'pretrain' or an arm name; `resolve`
    turns it into the foundry config (paths as `<name>` placeholders when hashing)."""

    def __init__(self, cfg: StudyConfig, data: Any = None, nproc: Optional[int] = None):
        self.cfg, self.data, self.nproc = cfg, data, nproc     # data: DataArtifacts (tiny) or None

    def data_paths(self) -> dict[str, Any]:
        """tokenizer, train (domain MDS root), pretrain (generic MDS root, tiny), and `eval`: name -> the held-out
        MDS split each metric reads (ce_<name>): the test splits, and the domain's validation split (lr choice)."""
        if self.cfg.scale == 'tiny':
            a = self.data
            ev = {'domain': a.mds['domain'] / 'test', 'generic': a.mds['generic'] / 'test',
                  'domain_val': a.mds['domain'] / 'val'}
            return {'tokenizer': str(a.tokenizer_dir), 'train': str(a.mds['domain']),
                    'pretrain': str(a.mds['generic']), 'eval': {k: str(v) for k, v in ev.items()}}
        ev = {'domain': _test_or_val(self.cfg.mds_dir), 'domain_val': str(Path(self.cfg.mds_dir) / 'val')}
        if self.cfg.generic_mds_dir:
            ev['generic'] = _test_or_val(self.cfg.generic_mds_dir)
        return {'tokenizer': str(Path(self.cfg.tokenizer).absolute()), 'train': str(Path(self.cfg.mds_dir).absolute()),
                'eval': ev}

    def eval_sets(self) -> dict[str, dict[str, Any]]:
        """name -> {split, unit, doc_tokens (None: sequence blocks), clusters, documents} of each held-out set."""
        out = {}
        for name, path in self.data_paths()['eval'].items():
            split = Path(path).name
            docs = (self.data.documents.get(f'{name.split("_")[0]}/{split}') if self.data is not None else None)
            out[name] = {'split': split, 'unit': 'document' if docs else 'sequence block',
                         'doc_tokens': [d['tokens'] for d in docs] if docs else None,
                         'clusters': [d['cluster'] for d in docs] if docs else None,
                         'documents': len(docs) if docs else None}
        return out

    def seq_len(self) -> Optional[int]:
        return self.cfg.max_seq_len or (self.cfg.data.max_seq_len if self.cfg.scale == 'tiny' else None)

    def spec(self, what: str, steps: int, name: str, dense_checkpoint: Optional[str] = None,
             seed_index: int = 0, lr: Optional[float] = None) -> RunSpec:
        """One run. seed_index i (phase 2): data order seed cfg.seed + i, router seed block seed + i."""
        cfg, tiny = self.cfg, self.cfg.scale == 'tiny'
        arm = None if what == 'pretrain' else arms.get(what)
        kind = 'pretrain' if arm is None else arm.recipe
        dp = self.data_paths() if (self.data is not None or not tiny) else {}
        variables: dict[str, Any] = {'run_name': name, 'seed': cfg.seed + seed_index, 'max_duration': f'{steps}ba'}
        top: dict[str, Any] = {'eval_first': False, 'eval_interval': f'{steps}ba', 'eval_subset_num_batches': 8}
        settings: dict[str, Any] = {'variables': variables, 'top': top}
        display = {
            'progress_bar': cfg.progress and (self.nproc or 1) == 1, 'log_to_console': False,
            'console_log_interval': f'{max(1, steps // 10)}ba',
            'python_log_level': 'info' if logging.getLogger('foundry_upcycle').isEnabledFor(logging.DEBUG)
            else 'warning',
        }
        paths: dict[str, Any] = {'save_folder': '<unset>'}
        seq = self.seq_len()
        if seq:
            variables['max_seq_len'] = seq
        if cfg.global_batch_size:
            variables['global_batch_size'] = cfg.global_batch_size
        if kind == 'pretrain':
            if cfg.pretrain_lr:
                variables['lr'] = cfg.pretrain_lr
        elif kind == 'cpt':
            if lr is not None:          # lr and, coupled to it, weight decay: the same rule as the upcycle block's
                from foundry_upcycle.transforms import lr_settings
                top['optimizer'] = lr_settings(self.recipe_optimizer(), lr)
        else:
            block: dict[str, Any] = dict(arm.upcycle)
            if lr is not None:          # the one place an upcycled run's lr is set (transforms rescales the decay)
                block['lr'] = lr
            if seed_index:
                base = cfg.upcycle.get('seed', self._recipe_block_seed())
                block['seed'] = int(base) + seed_index
            if block:
                settings['upcycle'] = block
            # router health (per-layer expert load, entropy, expert spread, LBL) into the run's jsonl log
            top['callbacks'] = {'upcycle_router_monitor': {'interval': max(1, steps // ROUTER_POINTS)}}
        if kind != 'pretrain':
            variables['warmup'] = warmup(steps, cfg.warmup_fraction)
            if cfg.hf_base:         # the yamls/hf recipes read the base directory (a path: not hashed)
                paths['model'] = str(Path(cfg.hf_base).expanduser().absolute())
            else:
                paths['dense_checkpoint'] = dense_checkpoint
        if tiny:
            variables.update(save_interval=f'{max(1, min(steps, 100))}ba', eval_interval=f'{steps}ba')
            if self.data is not None and 'vocab_size' not in cfg.model and not cfg.hf_base:
                top['model'] = {'vocab_size': self.data.vocab_size}
            pretrain = kind == 'pretrain'
            paths.update(data_dir=dp.get('pretrain' if pretrain else 'train'),
                         eval_data_dir=dp.get('train' if pretrain else 'pretrain'), tokenizer=dp.get('tokenizer'))
        else:
            paths.update(data_local=dp.get('train'), tokenizer_name=dp.get('tokenizer'))
            variables['tokenizer_kwargs'] = {'model_max_length': seq} if seq else {}
        return RunSpec(kind, settings, {'variables': paths}, display)

    def recipe_optimizer(self) -> dict[str, Any]:
        """The CPT recipe's optimizer block as resolved (the lr and weight decay every phase-2 lr is scaled from)."""
        return dict(self.resolve(self.spec(arms.BASELINE, 1, 'plan', '<dense>'), placeholders=True)['optimizer'])

    def _recipe_block_seed(self) -> int:
        from omegaconf import OmegaConf as om
        raw = om.to_container(om.load(self.cfg.recipe_path('upcycle')), resolve=False)
        return int((raw.get('upcycle') or {}).get('seed', 0))

    def resolve(self, spec: RunSpec, work: Optional[Path] = None, placeholders: bool = False) -> dict[str, Any]:
        spec = copy.deepcopy(spec)
        if work is not None:
            spec.paths['variables']['save_folder'] = str(work / 'checkpoints')
        run = build_recipe(self.cfg, spec, placeholders)
        if work is not None:
            run['loggers'] = {**(run.get('loggers') or {}), 'jsonl': {'path': str(work / 'metrics.jsonl')}}
        else:
            run.pop('loggers', None)
        return run


def _test_or_val(root: str) -> str:
    """A user's MDS folder: its test/ split, else val/ (then the report says that it also chose the lrs)."""
    test = Path(root) / 'test'
    return str((test if (test / 'index.json').is_file() else Path(root) / 'val').absolute())
