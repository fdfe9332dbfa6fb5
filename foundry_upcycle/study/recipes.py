"""A training run of the study as data: recipe kind, hashed settings, unhashed paths; and the resolved foundry config."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Mapping

from foundry_upcycle.study.config import StudyConfig


@dataclass(frozen=True)
class RunSpec:
    """One training run: a recipe, its variables and study-level settings; paths are kept apart from the hash."""
    kind: str                                  # pretrain | cpt | upcycle
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
    from foundry_upcycle.config import UpcycleConfig, moe_ffn_config
    model = copy.deepcopy(dict(dense_model))
    model['ffn_config'] = moe_ffn_config(model, UpcycleConfig.from_mapping(upcycle_block), 'torch')
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
