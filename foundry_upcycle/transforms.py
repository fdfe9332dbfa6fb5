"""Registered config transform: expands a recipe's top-level `upcycle:` block.

Foundry runs every registered transform on every `train` (before its unknown-key check), so this is a no-op
when the block is absent. With the block, the dense recipe's FFN becomes a dropless top-k MoE built from
config (so the optimizer sees the MoE parameters), and the dense checkpoint is loaded by `UpcycleLoader`
at BEFORE_LOAD, before Composer's autoresume, which then wins on a restart.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Mapping

from foundry_upcycle.checkpoint_io import require_readable_file
from foundry_upcycle.config import UpcycleConfig, moe_model_fields
from foundry_upcycle.moe_backend import resolve_backend

log = logging.getLogger(__name__)

BLOCK_KEY = 'upcycle'
LOADER_NAME = 'upcycle_loader'
MODEL_NAME = 'mpt_upcycle_causal_lm'
_DENSE_MODEL_NAMES = ('mpt_causal_lm', MODEL_NAME)
HF_MODEL_NAME = 'hf_upcycle_causal_lm'
_HF_MODEL_NAMES = ('hf_causal_lm', HF_MODEL_NAME)
# Options of a CPT recipe's dense load that the upcycle loader takes over.
_LOAD_KEYS = ('load_path', 'load_weights_only', 'load_strict_model_weights', 'load_ignore_keys')


def apply_upcycle_block(cfg: dict[str, Any]) -> dict[str, Any]:
    if BLOCK_KEY not in cfg:
        return cfg
    cfg = copy.deepcopy(dict(cfg))
    ucfg = UpcycleConfig.from_mapping(cfg.pop(BLOCK_KEY))
    return expand(cfg, ucfg)


def expand(cfg: dict[str, Any], ucfg: UpcycleConfig) -> dict[str, Any]:
    """The recipe `cfg` (without its upcycle block) turned into the upcycling recipe."""
    if cfg.get('python_log_level'):  # foundry sets its own loggers' level; ours follows it
        logging.getLogger('foundry_upcycle').setLevel(str(cfg['python_log_level']).upper())
    model = cfg.get('model')
    if not isinstance(model, dict):
        raise ValueError('upcycle: the recipe has no `model:` block to upcycle')
    if model.get('name') in _HF_MODEL_NAMES:
        cfg['model'], source = upcycled_hf_model_config(model, ucfg)
        if cfg.get('load_path') is not None:
            raise ValueError(f'load_path ({cfg["load_path"]}): with model.name hf_causal_lm the upcycle block reads the '
                             'dense weights from model.pretrained_model_name_or_path; drop load_path')
        _check_tokenizer(cfg)
    elif model.get('name') in _DENSE_MODEL_NAMES:
        cfg['model'] = upcycled_model_config(model, ucfg, resolve_backend(ucfg.backend, cfg.get('precision')))
        source = _take_source(cfg, ucfg)
    else:
        raise ValueError(f'model.name {model.get("name")!r}: the upcycle block supports mpt_causal_lm and '
                         'hf_causal_lm (Llama / Mistral checkpoints)')
    _non_reentrant_checkpointing(cfg)
    model = cfg['model']
    if ucfg.lr is not None:
        if not isinstance(cfg.get('optimizer'), dict):
            raise ValueError('upcycle.lr is set but the recipe has no `optimizer:` block')
        _set_lr(cfg['optimizer'], ucfg.lr)
    callbacks = cfg.get('callbacks') or {}
    if LOADER_NAME in callbacks:
        raise ValueError(f'callbacks.{LOADER_NAME} is set by the upcycle block; remove it from the recipe')
    callbacks[LOADER_NAME] = {
        'source': source,
        **ucfg.weights().to_mapping(),
        'autoresume': bool(cfg.get('autoresume', False)),  # the loader skips its work when Composer will resume
    }
    cfg['callbacks'] = callbacks
    if ucfg.expert_noise_std:
        log.warning('upcycle.expert_noise_std=%s: the upcycled model will not reproduce the dense one at step 0',
                    ucfg.expert_noise_std)
    if ucfg.drop_ratio:
        log.warning('upcycle.drop_ratio=%s (Drop-Upcycling): each expert re-draws that fraction of its FFN rows, so '
                    'the upcycled model does not reproduce the dense one at step 0 (by design)', ucfg.drop_ratio)
    if ucfg.router_weights == 'softmax' and ucfg.grow == 1:
        log.warning('upcycle.router_weights=softmax: no top-k renormalisation, expert outputs scaled by E/K=%g; the '
                    'upcycled model is close to, not equal to, the dense one at step 0 (Mixtral export cannot hold it)',
                    ucfg.expert_output_scale)
    backend = model['ffn_config']['ffn_type'] if 'ffn_config' in model else 'transformers Mixtral'
    log.info('upcycle: %d experts, top-%d, %s backend, %s weights from %s', ucfg.total_experts, ucfg.total_top_k,
             backend, 'MoE' if ucfg.grow > 1 else 'dense', source)
    return cfg


def upcycled_model_config(model: dict[str, Any], ucfg: UpcycleConfig, backend: str) -> dict[str, Any]:
    """A dense MPT `model:` block -> its upcycled MoE block (backend 'torch' or 'megablocks')."""
    model = copy.deepcopy(model)
    if model.get('block_overrides') and ucfg.moe_layers is not None:
        raise ValueError('upcycle.moe_layers cannot be combined with model.block_overrides (both set per-block configs)')
    model.update(moe_model_fields(model, ucfg, backend))
    model['name'] = MODEL_NAME
    # mb_dmoe's load-balancing loss is added by foundry itself (moe_loss_weight); torch_dmoe's by our model.
    model['load_balancing_loss_weight'] = ucfg.load_balancing_loss_weight if backend == 'torch' else 0.0
    model['router_zloss_weight'] = ucfg.zloss_weight
    return model


def upcycled_hf_model_config(model: dict[str, Any], ucfg: UpcycleConfig) -> tuple[dict[str, Any], str]:
    """A dense `hf_causal_lm` block (Llama / Mistral directory) -> the `hf_upcycle_causal_lm` block, and the
    dense directory the loader tiles from. ValueError naming the key for what transformers' Mixtral cannot hold."""
    from foundry_upcycle.llama_to_mixtral import read_source_config
    path = model.get('pretrained_model_name_or_path')
    if not isinstance(path, str) or not path:
        raise ValueError('model.pretrained_model_name_or_path: missing; name the dense Hugging Face directory')
    if ucfg.source is not None and ucfg.source != path:
        raise ValueError(f'upcycle.from ({ucfg.source}): with hf_causal_lm the dense weights are read from '
                         f'model.pretrained_model_name_or_path ({path}); drop upcycle.from')
    if not Path(path).expanduser().is_dir():
        raise ValueError(f'model.pretrained_model_name_or_path: {path} is not a local directory (upcycling reads the '
                         'dense safetensors from disk; download or convert the model first)')
    read_source_config(path, ucfg.weights(), 'model.pretrained_model_name_or_path')   # refuses moe_layers, ...
    refused = {'router_weights': ucfg.router_weights != 'renormalized', 'zloss_weight': ucfg.zloss_weight > 0,
               'backend': ucfg.backend == 'megablocks', 'moe_world_size': ucfg.moe_world_size != 1}
    for key, bad in refused.items():
        if bad:
            raise ValueError(f'upcycle.{key}={getattr(ucfg, key)!r}: not available with hf_causal_lm (transformers\' '
                             'Mixtral renormalises the top-k weights, has no router z-loss, and runs its own experts)')
    model = copy.deepcopy(model)
    if model.get('name') == HF_MODEL_NAME and 'upcycle' in model:
        raise ValueError('model.upcycle is set by the upcycle block; remove it from the recipe')
    model['name'] = HF_MODEL_NAME
    model['upcycle'] = {'num_experts': ucfg.num_experts, 'top_k': ucfg.top_k,
                        'load_balancing_loss_weight': ucfg.load_balancing_loss_weight}
    model['upcycle'].update({k: getattr(ucfg, k) for k in ('granularity', 'grow') if getattr(ucfg, k) != 1})
    return model, path


def _check_tokenizer(cfg: dict[str, Any]) -> None:
    from foundry_upcycle.gguf import check_tokenizer_dir
    name = (cfg.get('tokenizer') or {}).get('name')
    if isinstance(name, str) and Path(name).expanduser().is_dir():
        check_tokenizer_dir(Path(name).expanduser(), 'tokenizer.name')


def _non_reentrant_checkpointing(cfg: dict[str, Any]) -> None:
    """Composer's FSDP1 activation checkpointing is reentrant by default: the block's forward then runs under
    no_grad and the router losses get no gradient. Non-reentrant keeps them attached (see model.py)."""
    fsdp = cfg.get('fsdp_config')
    if not isinstance(fsdp, dict) or not fsdp.get('activation_checkpointing'):
        return
    key = 'activation_checkpointing_reentrant'
    if fsdp.get(key, None) is True:
        raise ValueError(f'fsdp_config.{key}: true cuts the router losses off the router (the checkpointed forward '
                         'runs under no_grad); set it to false (non-reentrant) for an upcycled model')
    if key not in fsdp:
        log.warning('upcycle: setting fsdp_config.%s: false (Composer defaults to reentrant, under which the '
                    'load-balancing loss would not reach the router)', key)
        fsdp[key] = False


def _take_source(cfg: dict[str, Any], ucfg: UpcycleConfig) -> str:
    """The dense checkpoint: `upcycle.from`, or the CPT recipe's own `load_path`, whose loading we take over."""
    load_path = cfg.get('load_path')
    source = ucfg.source or load_path
    if source is None:
        raise ValueError('upcycle.from: missing; name the dense checkpoint (or keep the CPT recipe\'s load_path)')
    if load_path is not None and load_path != source:
        raise ValueError(f'upcycle.from ({source}) and load_path ({load_path}) name different checkpoints; '
                         'the upcycle block loads the dense one itself, so drop load_path')
    for key in _LOAD_KEYS:
        cfg.pop(key, None)
    if '://' not in source:
        require_readable_file(source, 'upcycle.from')
    return source


def lr_settings(optimizer: Mapping[str, Any], lr: float) -> dict[str, Any]:
    """The optimizer keys that train a recipe at `lr` instead of its own: lr, and for Composer's decoupled
    optimizers, which decay by weight_decay per step (not lr * weight_decay), weight_decay scaled with lr to keep
    the paper's (coupled) decay. The one rule for every arm: the upcycle block's lr goes through it, and the
    study sets the CPT arm's lr with it too."""
    out: dict[str, Any] = {'lr': lr}
    old = optimizer.get('lr')
    if str(optimizer.get('name', '')).startswith('decoupled_') and old and optimizer.get('weight_decay'):
        out['weight_decay'] = float(optimizer['weight_decay']) * lr / float(old)
    return out


def _set_lr(optimizer: dict[str, Any], lr: float) -> None:
    optimizer.update(lr_settings(optimizer, lr))
