"""Offline upcycling: dense checkpoint in, MoE checkpoint out, for users who prefer `load_path:`.

Shares the weight transform with the `upcycle_loader` callback (`upcycle.upcycle_state_dict`).
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Mapping, Optional

from foundry_upcycle.checkpoint_io import load_state_dict, save_composer_weights, save_safetensors
from foundry_upcycle.config import UpcycleConfig, dense_ffn_shape
from foundry_upcycle.upcycle import split_ffn_keys, upcycle_state_dict

log = logging.getLogger(__name__)


def convert(source: str, out: str, ucfg: UpcycleConfig, model_cfg: Optional[Mapping[str, Any]] = None,
            overwrite: bool = False) -> Path:
    """Writes the upcycled checkpoint to `out` (.safetensors, else a weights-only Composer .pt) atomically."""
    dest = Path(out)
    if dest.exists() and not overwrite:
        raise ValueError(f'--out {out} already exists; pass --overwrite to replace it')
    moe = upcycle_state_dict(load_state_dict(source, 'dense checkpoint'), ucfg.num_experts, ucfg.router_init_std,
                             ucfg.seed, ucfg.expert_noise_std, ucfg.expert_output_scale)
    if model_cfg is not None:
        check_against_model_config(moe, model_cfg, ucfg, source)
    meta = {'foundry_upcycle': {'source': str(source), **ucfg.to_mapping()}}
    if dest.suffix == '.safetensors':
        save_safetensors(moe, str(dest), {'foundry_upcycle': repr(meta['foundry_upcycle'])})
    else:
        save_composer_weights(moe, str(dest), meta)
    log.info('wrote %s (%d tensors)', dest, len(moe))
    return dest


def check_against_model_config(moe: Mapping[str, Any], model_cfg: Mapping[str, Any], ucfg: UpcycleConfig,
                               source: str) -> None:
    """Cheap shape check against a recipe's dense `model:` block, without building the model."""
    _, hidden = dense_ffn_shape(model_cfg)
    d_model, n_layers = model_cfg.get('d_model'), model_cfg.get('n_layers')
    prefix, blocks = split_ffn_keys(moe)
    if n_layers is not None and len(blocks) != n_layers:
        raise ValueError(f'{source}: {len(blocks)} blocks, but model.n_layers is {n_layers}')
    w1 = blocks[0]['experts.mlp.w1']
    want = (ucfg.num_experts * hidden, d_model)
    if tuple(w1.shape) != want:
        raise ValueError(f'{source}: {prefix}0.ffn.experts.mlp.w1 is {tuple(w1.shape)} but the recipe expects {want} '
                         '(check model.d_model and ffn_hidden_size / expansion_ratio)')


def offline_recipe(expanded: dict[str, Any], moe_checkpoint: str) -> dict[str, Any]:
    """An expanded upcycling recipe that loads a converted checkpoint through `load_path` instead of the callback."""
    cfg = copy.deepcopy(expanded)
    callbacks = cfg.get('callbacks') or {}
    callbacks.pop('upcycle_loader', None)
    cfg['callbacks'] = callbacks
    cfg['load_path'] = moe_checkpoint
    cfg['load_weights_only'] = True
    return cfg
