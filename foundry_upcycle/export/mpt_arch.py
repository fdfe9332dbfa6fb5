"""What an MPT model config computes, in the terms the HF export targets need (`MPTArch`), and every reason
shared by all targets that it cannot be exported (`Problems`). Target-specific rules: `target_check.py`.
Imports torch-free standard library only (and, lazily, the upcycle block's config expansion).
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

log = logging.getLogger(__name__)

MPT_DEFAULTS: dict[str, Any] = {
    'd_model': 2048, 'n_heads': 16, 'n_layers': 24, 'head_dim': None, 'expansion_ratio': 4, 'max_seq_len': 2048,
    'vocab_size': 50368, 'learned_pos_emb': True, 'logit_scale': None, 'no_bias': False, 'attention_bias': None,
    'norm_type': 'low_precision_layernorm', 'norm_eps': 1e-05, 'tie_word_embeddings': True,
    'block_overrides': None, 'final_logit_softcapping': None,
}
ATTN_DEFAULTS: dict[str, Any] = {
    'attn_type': 'multihead_attention', 'qk_ln': False, 'qk_gn': False, 'fused_qkv': True, 'clip_qkv': None,
    'softmax_scale': None, 'sliding_window_size': -1, 'attn_logit_softcapping': None, 'alibi': False,
    'rope': False, 'nope': False, 'rope_theta': 10000, 'rope_impl': 'dail',
    'rope_dail_config': {'type': 'original', 'pos_idx_in_fp32': True, 'xpos_scale_base': 512},
    'rope_hf_config': {'type': 'no_scaling', 'factor': 1.0},
    'attn_temperature_tuning': {'floor_scale': 8192, 'attn_scale': 0.0}, 'kv_dim': None,
}
# Model keys that do not change what the trained weights compute at inference.
INERT_MODEL_KEYS = {
    'name', 'init_device', 'init_config', 'resid_pdrop', 'emb_pdrop', 'embedding_fraction', 'use_cache', 'fc_type',
    'use_pad_tok_in_ffn', 'loss_fn', 'tokenizer', 'use_train_metrics', 'additional_train_metrics', 'attn_config',
    'ffn_config', 'pad_token_id', 'bos_token_id', 'eos_token_id',
    'load_balancing_loss_weight', 'router_zloss_weight',  # mpt_upcycle_causal_lm's training losses
    'expert_granularity', 'expert_grow', 'dense_ffn_config', 'moe_layers',  # variants (moe_layers is refused below)
}
INERT_ATTN_KEYS = {'attn_pdrop', 'attn_impl', 'attn_uses_sequence_id', 'kv_n_heads', 'rope_dail_config',
                   'alibi_bias_max'}
# ffn_config keys that only matter for training or parallel layout.
INERT_FFN_KEYS = {
    'fc_type', 'return_bias', 'moe_world_size', 'mlp_impl', 'moe_loss_weight', 'moe_zloss_weight',
    'moe_zloss_in_fp32', 'moe_lbl_in_fp32', 'moe_expert_model_parallelism', 'moe_weight_parallelism',
    'memory_optimized_mlp', 'device_mesh', 'bias', 'init_method', 'output_layer_init_method', 'fp16', 'bf16',
}
RMS_NORMS = ('rmsnorm', 'low_precision_rmsnorm', 'triton_rmsnorm')
LAYER_NORMS = ('layernorm', 'low_precision_layernorm')
MOE_FFNS = ('torch_dmoe', 'mb_dmoe')


@dataclass(frozen=True)
class MPTArch:
    """What an MPT model config computes, in the terms the export targets need."""
    d_model: int
    n_heads: int
    kv_heads: int
    n_layers: int
    vocab_size: int
    max_seq_len: int
    norm: str                 # 'rms' | 'layer'
    norm_eps: float
    rope_theta: float
    rope_scaling: Optional[dict]
    tied: bool
    fused_qkv: bool
    clip_qkv: Optional[float]
    ffn_hidden: int
    act: str                  # transformers ACT2FN name
    moe: bool
    num_experts: int = 0
    top_k: int = 0
    normalize: Optional[float] = None   # p of the top-k weight renormalisation, None: none
    aux_loss_weight: float = 0.01

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def _merged(defaults: Mapping[str, Any], given: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    out = copy.deepcopy(dict(defaults))
    for k, v in (given or {}).items():
        out[k] = {**out[k], **v} if isinstance(out.get(k), dict) and isinstance(v, Mapping) else v
    return out


def _act_name(ffn_act_fn: Optional[Mapping[str, Any]], default: Mapping[str, Any]) -> tuple[Optional[str], str]:
    """MPT `ffn_act_fn` -> (transformers ACT2FN name or None, description)."""
    act = dict(ffn_act_fn or default)
    name, approximate = act.pop('name', None), act.pop('approximate', 'none')
    if act:
        return None, f'{dict(ffn_act_fn or default)}'
    table = {('silu', 'none'): 'silu', ('gelu', 'none'): 'gelu', ('gelu', 'tanh'): 'gelu_pytorch_tanh',
             ('relu', 'none'): 'relu'}
    return table.get((name, approximate)), f'{dict(ffn_act_fn or default)}'


def _rope_scaling(rope_hf_config: Mapping[str, Any]) -> Optional[dict]:
    cfg = dict(rope_hf_config)
    kind = cfg.pop('type', 'no_scaling')
    return None if kind == 'no_scaling' else {'rope_type': kind, **cfg}


class Problems:
    """Collects every reason a config cannot be exported, so one error names them all."""

    def __init__(self):
        self.items: list[str] = []

    def add(self, key: str, why: str) -> None:
        self.items.append(f'model.{key}: {why}')

    def raise_if_any(self, what: str) -> None:
        if self.items:
            raise ValueError(f'{what}:\n  - ' + '\n  - '.join(self.items))


def resolve_model_config(model_cfg: Mapping[str, Any], upcycle: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """The model config the checkpoint was trained with: a dense recipe plus an `upcycle:` block becomes MoE."""
    cfg = copy.deepcopy(dict(model_cfg))
    if upcycle is not None:
        from foundry_upcycle.config import UpcycleConfig
        from foundry_upcycle.transforms import upcycled_model_config
        ffn_type = (cfg.get('ffn_config') or {}).get('ffn_type', 'mptmlp')
        if ffn_type not in MOE_FFNS:  # torch layout: the same weights as mb_dmoe
            cfg = upcycled_model_config(cfg, UpcycleConfig.from_mapping(upcycle), 'torch')
    return cfg


def parse_mpt_config(model_cfg: Mapping[str, Any]) -> tuple[MPTArch, Problems]:
    """Reads an MPT model config (a YAML `model:` block or MPTConfig.to_dict()) into an MPTArch.

    Returns the problems every target shares (biases, positions, attention variants); target-specific
    checks happen in `check_target`.
    """
    p = Problems()
    cfg = _merged(MPT_DEFAULTS, {k: v for k, v in model_cfg.items() if k in MPT_DEFAULTS})
    attn = _merged(ATTN_DEFAULTS, model_cfg.get('attn_config'))
    ffn = dict(model_cfg.get('ffn_config') or {'ffn_type': 'mptmlp'})
    unknown = sorted(set(model_cfg) - set(MPT_DEFAULTS) - INERT_MODEL_KEYS)
    if unknown:
        log.warning('model keys %s are unknown to the HF exporter and are ignored', unknown)

    d, h = int(cfg['d_model']), int(cfg['n_heads'])
    if cfg['head_dim'] not in (None, d // h):
        p.add('head_dim', f'{cfg["head_dim"]} != d_model / n_heads; MPT splits Wqkv by d_model')
    if not cfg['no_bias']:
        p.add('no_bias', 'must be true: the targets hold no biases')
    if cfg['attention_bias']:
        p.add('attention_bias', 'must be false: the targets hold no attention biases')
    if model_cfg.get('moe_layers') is not None:
        p.add('moe_layers', f'{model_cfg["moe_layers"]}: dense blocks among MoE blocks; Mixtral and DBRX hold a '
              'mixture of experts in every block (export the model trained with an MoE in every block)')
    for key in ('logit_scale', 'final_logit_softcapping', 'block_overrides'):
        if cfg[key] is not None:
            p.add(key, f'{cfg[key]!r} has no equivalent in the targets (must be null)')
    if attn['alibi']:
        p.add('attn_config.alibi', 'ALiBi has no equivalent in the targets (they use rope)')
    elif not attn['rope']:
        p.add('attn_config.rope', 'must be true: learned positional embeddings (learned_pos_emb) have no equivalent '
              'in the targets')
    if attn['rope'] and attn['rope_impl'] == 'dail' and attn['rope_dail_config'].get('type') != 'original':
        p.add('attn_config.rope_dail_config.type', f'{attn["rope_dail_config"].get("type")!r} (xpos) is not supported')
    for key, ok in (('qk_ln', False), ('qk_gn', False), ('nope', False), ('sliding_window_size', -1),
                    ('attn_logit_softcapping', None), ('kv_dim', None)):
        if attn[key] != ok:
            p.add(f'attn_config.{key}', f'{attn[key]!r} is not supported by the targets (must be {ok!r})')
    if (attn['attn_temperature_tuning'] or {}).get('attn_scale', 0) != 0:
        p.add('attn_config.attn_temperature_tuning.attn_scale', 'must be 0: the targets have no temperature tuning')
    if attn['softmax_scale'] is not None and not math.isclose(attn['softmax_scale'], (d // h)**-0.5):
        p.add('attn_config.softmax_scale', f'{attn["softmax_scale"]} != 1/sqrt(head_dim); the targets fix it')
    unknown_attn = sorted(set(attn) - set(ATTN_DEFAULTS) - INERT_ATTN_KEYS)
    if unknown_attn:
        log.warning('attn_config keys %s are unknown to the HF exporter and are ignored', unknown_attn)

    kv = {'multihead_attention': h, 'multiquery_attention': 1}.get(attn['attn_type'])
    if attn['attn_type'] == 'grouped_query_attention':
        kv = attn.get('kv_n_heads')
        if not isinstance(kv, int) or kv < 1 or h % kv:
            p.add('attn_config.kv_n_heads', f'{kv!r} must be a positive divisor of n_heads={h}')
            kv = h
    elif kv is None:
        p.add('attn_config.attn_type', f'{attn["attn_type"]!r} is not supported')
        kv = h

    norm_type = str(cfg['norm_type']).lower()
    norm = 'rms' if norm_type in RMS_NORMS else 'layer' if norm_type in LAYER_NORMS else None
    if norm is None:
        p.add('norm_type', f'{norm_type!r} is not supported (RMSNorm or LayerNorm)')
        norm = 'rms'

    ffn_type = ffn.get('ffn_type', 'mptmlp')
    moe = ffn_type in MOE_FFNS
    if ffn_type not in (*MOE_FFNS, 'mptglu'):
        why = ('mb_moe drops tokens over capacity; the targets are dropless' if ffn_type == 'mb_moe'
               else 'the targets need a GLU MLP (mptglu) or a dropless GLU MoE (torch_dmoe / mb_dmoe)')
        p.add('ffn_config.ffn_type', f'{ffn_type!r}: {why}')
    if moe and ffn.get('mlp_type', 'mlp') != 'glu':
        p.add('ffn_config.mlp_type', f'{ffn.get("mlp_type", "mlp")!r}: the targets need GLU experts (mlp_type: glu)')
    # mptglu and torch_dmoe default to exact GELU; megablocks (mb_dmoe) to tanh GELU.
    default_act = {'name': 'gelu', 'approximate': 'tanh'} if ffn_type == 'mb_dmoe' else {'name': 'gelu'}
    act, act_desc = _act_name(ffn.get('ffn_act_fn'), default_act)
    if act is None:
        p.add('ffn_config.ffn_act_fn', f'{act_desc} has no transformers equivalent')
        act = 'silu'
    hidden = ffn.get('ffn_hidden_size') or d * cfg['expansion_ratio']
    if int(hidden) != hidden:
        p.add('expansion_ratio', f'd_model * expansion_ratio = {hidden} is not an integer')

    normalize = ffn.get('moe_normalize_expert_weights')
    if moe:
        if ffn.get('moe_jitter_eps') is not None:
            p.add('ffn_config.moe_jitter_eps', f'{ffn["moe_jitter_eps"]!r}: router jitter is applied differently by '
                  'the targets (to the expert inputs too); must be null')
        if ffn.get('uniform_expert_assignment'):
            p.add('ffn_config.uniform_expert_assignment', 'must be false: the targets always route by the router')
        if ffn.get('shared_expert'):
            p.add('ffn_config.shared_expert', 'shared experts have no equivalent in the targets')
        for key in ('moe_num_experts', 'moe_top_k'):
            if not isinstance(ffn.get(key), int):
                p.add(f'ffn_config.{key}', f'must be set to an integer, got {ffn.get(key)!r}')
        known = {'ffn_type', 'ffn_hidden_size', 'ffn_act_fn', 'mlp_type', 'moe_num_experts', 'moe_top_k',
                 'moe_jitter_eps', 'moe_normalize_expert_weights', 'uniform_expert_assignment', 'shared_expert'}
        unknown_ffn = sorted(set(ffn) - known - INERT_FFN_KEYS)
        if unknown_ffn:
            log.warning('ffn_config keys %s are unknown to the HF exporter and are ignored', unknown_ffn)

    arch = MPTArch(
        d_model=d, n_heads=h, kv_heads=kv, n_layers=int(cfg['n_layers']), vocab_size=int(cfg['vocab_size']),
        max_seq_len=int(cfg['max_seq_len']), norm=norm, norm_eps=float(cfg['norm_eps']),
        rope_theta=float(attn['rope_theta']), rope_scaling=_rope_scaling(attn['rope_hf_config']),
        tied=bool(cfg['tie_word_embeddings']), fused_qkv=bool(attn['fused_qkv']), clip_qkv=attn['clip_qkv'],
        ffn_hidden=int(hidden), act=act, moe=moe, num_experts=int(ffn.get('moe_num_experts') or 0) if moe else 0,
        top_k=int(ffn.get('moe_top_k') or 0) if moe else 0, normalize=(normalize or None) if moe else None,
        aux_loss_weight=float(ffn.get('moe_loss_weight', model_cfg.get('load_balancing_loss_weight') or 0.01)),
    )
    if arch.rope_scaling is not None and attn['rope_impl'] != 'hf':
        p.add('attn_config.rope_hf_config', 'rope scaling is only read with rope_impl: hf')
    return arch, p
