"""MPT (foundry `mpt_causal_lm` / `mpt_upcycle_causal_lm`) -> Hugging Face Llama, Mistral, Mixtral or DBRX.

Targets and what they need from the MPT model config:
  llama / mistral  dense `mptglu`, SiLU, RMSNorm, rope                     -> LlamaForCausalLM / MistralForCausalLM
  mixtral          `torch_dmoe`/`mb_dmoe` GLU, SiLU, RMSNorm, rope, top-k weights renormalised (p=1)
                                                                            -> MixtralForCausalLM
  dbrx             `torch_dmoe`/`mb_dmoe` GLU, bias-free LayerNorm (eps 1e-5), rope, untied -> DbrxForCausalLM
All targets: no biases, no ALiBi / learned positions, plain softmax attention. Anything else is refused with a
ValueError naming the config key, rather than exported into a model that computes something different.

Shapes: V vocab, D d_model, F ffn_hidden_size, E experts, H heads, KV kv heads, hd = D / H head dim.
  MPT   attn.Wqkv [(H + 2 KV) hd, D] (q, k, v stacked), ffn.experts.mlp.w1/v1/w2 [E F, D]
  Llama self_attn.q_proj [H hd, D], k_proj/v_proj [KV hd, D];  Mixtral experts.{e}.w1/w3 [F, D], w2 [D, F]
  DBRX  keeps MPT's fused Wqkv and [E F, D] expert tensors.
Rope: MPT's `rope_impl: hf` is transformers' LlamaRotaryEmbedding with rotate-half (GPT-NeoX) pairing, the
convention of all four targets; `dail` (non-interleaved) is the same rotation.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import torch

from foundry_upcycle.atomic import atomic_output_dir
from foundry_upcycle.export.targets import (ARCHITECTURES, ENGINES_FILE, TARGETS, engines_record,  # noqa: F401
                                            parse_dtype)
from foundry_upcycle.export.writer import write_sharded
from foundry_upcycle.jobs import Job, MemorySource, TensorSpec, run_jobs
from foundry_upcycle.reader import open_source
from foundry_upcycle.upcycle import MEGABLOCKS_TO_DENSE, MIXTRAL_EXPERT_NAMES

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30

# MPTConfig's defaults for the keys that decide the architecture (tests compare them with llmfoundry's).
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


def check_target(model_cfg: Mapping[str, Any], target: str = 'auto') -> tuple[str, MPTArch]:
    """Resolves `target` ('auto' picks from the config) and raises ValueError naming every blocking key."""
    if target not in TARGETS:
        raise ValueError(f'target must be one of {TARGETS}, got {target!r}')
    arch, p = parse_mpt_config(model_cfg)
    if target == 'auto':
        target = ('mixtral' if arch.norm == 'rms' else 'dbrx') if arch.moe else 'llama'
    if arch.moe and target in ('llama', 'mistral'):
        p.add('ffn_config.ffn_type', f'a mixture of experts cannot be exported as {target}; use mixtral or dbrx')
    if not arch.moe and target in ('mixtral', 'dbrx'):
        p.add('ffn_config.ffn_type', f'a dense model cannot be exported as {target}; use llama or mistral')
    if target in ('llama', 'mistral', 'mixtral'):
        if arch.norm != 'rms':
            p.add('norm_type', f'{target} uses RMSNorm; LayerNorm-shaped MoE models export to dbrx')
        if arch.act != 'silu':
            p.add('ffn_config.ffn_act_fn', f'{target} uses SiLU, the model uses {arch.act}')
        if arch.clip_qkv is not None:
            p.add('attn_config.clip_qkv', f'{target} has no qkv clipping (dbrx has); must be null')
    if target == 'mixtral' and arch.normalize != 1:
        p.add('ffn_config.moe_normalize_expert_weights', f'{arch.normalize!r}: Mixtral always renormalises the '
              'top-k router weights to sum to 1, so the model must use moe_normalize_expert_weights: 1')
    if target == 'dbrx':
        if arch.norm != 'layer':
            p.add('norm_type', 'dbrx uses LayerNorm; RMSNorm-shaped MoE models export to mixtral')
        elif not math.isclose(arch.norm_eps, 1e-5):
            p.add('norm_eps', f'{arch.norm_eps}: dbrx fixes the LayerNorm eps at 1e-5')
        if arch.tied:
            p.add('tie_word_embeddings', 'dbrx cannot tie the embedding and the LM head; must be false')
        if arch.rope_scaling is not None:
            p.add('attn_config.rope_hf_config.type', f'{arch.rope_scaling["rope_type"]!r}: dbrx has no rope scaling')
    p.raise_if_any(f'cannot export this MPT model as {target}')
    return target, arch


def vllm_differences(arch: MPTArch, target: str) -> dict[str, str]:
    """{config key: why} for each way vLLM would compute this export differently from the trained model.

    vLLM's DBRX runs a fused MoE with SiLU and renormalised top-k whatever `ffn_act_fn` and
    `moe_normalize_expert_weights` say; vLLM's Mixtral builds its rotary embedding without `rope_scaling`.
    """
    out = {}
    if target == 'dbrx':
        if arch.act != 'silu':
            out['ffn_config.ffn_act_fn'] = f"{arch.act}: vLLM's DBRX always applies SiLU in its experts"
        if arch.normalize != 1:
            out['ffn_config.moe_normalize_expert_weights'] = (
                f"{arch.normalize!r}: vLLM's DBRX always renormalises the top-k router weights to sum to 1")
    if target == 'mixtral' and arch.rope_scaling is not None:
        out['attn_config.rope_hf_config'] = (f"{arch.rope_scaling['rope_type']!r} rope scaling: vLLM's Mixtral "
                                             'ignores rope_scaling')
    return out


def engine_support(arch: MPTArch, target: str, allow_inexact_engines: bool = False) -> dict[str, Any]:
    """Which engines compute the export exactly (written to engines.json). Raises ValueError naming each key
    that vLLM would compute differently, unless `allow_inexact_engines` (then a warning names them)."""
    diffs = vllm_differences(arch, target)
    if diffs and not allow_inexact_engines:
        raise ValueError(f'{target} export would load in vLLM but compute another function:\n  - '
                         + '\n  - '.join(f'model.{k}: {v}' for k, v in diffs.items())
                         + '\nchange the model, or pass allow_inexact_engines / --allow-inexact-engines to export '
                         'it for transformers only')
    for key, why in diffs.items():
        log.warning('export for transformers only: vLLM would compute it differently (model.%s: %s)', key, why)
    return engines_record(target, diffs)


def hf_config(arch: MPTArch, target: str, dtype: torch.dtype):
    """The transformers config of the exported model."""
    if target == 'dbrx':
        from transformers import DbrxConfig
        return DbrxConfig(
            d_model=arch.d_model, n_heads=arch.n_heads, n_layers=arch.n_layers, max_seq_len=arch.max_seq_len,
            vocab_size=arch.vocab_size, tie_word_embeddings=False, torch_dtype=dtype,
            attn_config={'clip_qkv': arch.clip_qkv, 'kv_n_heads': arch.kv_heads, 'rope_theta': arch.rope_theta},
            ffn_config={'ffn_act_fn': {'name': arch.act}, 'ffn_hidden_size': arch.ffn_hidden,
                        'moe_num_experts': arch.num_experts, 'moe_top_k': arch.top_k, 'moe_jitter_eps': None,
                        'moe_loss_weight': arch.aux_loss_weight, 'moe_normalize_expert_weights': arch.normalize},
            architectures=[ARCHITECTURES[target]],
        )
    from transformers import LlamaConfig, MistralConfig, MixtralConfig
    common = dict(
        vocab_size=arch.vocab_size, hidden_size=arch.d_model, intermediate_size=arch.ffn_hidden,
        num_hidden_layers=arch.n_layers, num_attention_heads=arch.n_heads, num_key_value_heads=arch.kv_heads,
        head_dim=arch.head_dim, hidden_act='silu', max_position_embeddings=arch.max_seq_len,
        rms_norm_eps=arch.norm_eps, tie_word_embeddings=arch.tied, rope_theta=arch.rope_theta,
        rope_scaling=arch.rope_scaling, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        torch_dtype=dtype, architectures=[ARCHITECTURES[target]],
    )
    if target == 'llama':
        return LlamaConfig(attention_bias=False, mlp_bias=False, **common)
    if target == 'mistral':
        return MistralConfig(sliding_window=None, **common)
    # Serving config: with output_router_logits, transformers 4.51's Mixtral computes the aux loss on every decode
    # step and fails under a KV cache. Training turns it on through the recipe (yamls/hf/mixtral.yaml:
    # model.config_overrides.output_router_logits: true); foundry's hf_causal_lm does not set it.
    return MixtralConfig(sliding_window=None, num_local_experts=arch.num_experts, num_experts_per_tok=arch.top_k,
                         output_router_logits=False, router_aux_loss_coef=arch.aux_loss_weight,
                         router_jitter_noise=0.0, **common)


# ---------------------------------------------------------------- weights

_BLOCK = re.compile(r'^transformer\.blocks\.(\d+)\.(.+)$')


def _strip_prefix(names: Iterable[str]) -> dict[str, str]:
    """{MPT name without the key prefix (Composer's `model.`) and fused-block `norm_attn_norm.` level: source name}."""
    names = list(names)
    anchors = [k for k in names if k.endswith('transformer.wte.weight')]
    if len(anchors) != 1:
        raise ValueError('checkpoint: no single `transformer.wte.weight` tensor; not an MPT state dict')
    prefix = anchors[0][:-len('transformer.wte.weight')]
    outside = sorted(k for k in names if not k.startswith(prefix))
    if outside:
        raise ValueError(f'checkpoint: tensors outside the model prefix {prefix!r}: {outside[:5]}')
    return {k[len(prefix):].replace('.norm_attn_norm.', '.'): k for k in names}


def _expected_mpt_keys(arch: MPTArch) -> list[str]:
    attn = ['attn.Wqkv.weight'] if arch.fused_qkv else ['attn.Wq.weight', 'attn.Wk.weight', 'attn.Wv.weight']
    ffn = (['ffn.router.layer.weight', 'ffn.experts.mlp.w1', 'ffn.experts.mlp.v1', 'ffn.experts.mlp.w2'] if arch.moe
           else ['ffn.gate_proj.weight', 'ffn.up_proj.weight', 'ffn.down_proj.weight'])
    keys = ['transformer.wte.weight', 'transformer.norm_f.weight'] + ([] if arch.tied else ['lm_head.weight'])
    for i in range(arch.n_layers):
        keys += [f'transformer.blocks.{i}.{k}' for k in ('norm_1.weight', *attn, 'attn.out_proj.weight',
                                                          'norm_2.weight', *ffn)]
    return keys


def _expected_shapes(arch: MPTArch) -> dict[str, tuple[int, ...]]:
    D, F, E, hd = arch.d_model, arch.ffn_hidden, arch.num_experts, arch.head_dim
    q, kv = arch.n_heads * hd, arch.kv_heads * hd
    per_layer = {
        'norm_1.weight': (D,), 'norm_2.weight': (D,), 'attn.Wqkv.weight': (q + 2 * kv, D), 'attn.Wq.weight': (q, D),
        'attn.Wk.weight': (kv, D), 'attn.Wv.weight': (kv, D), 'attn.out_proj.weight': (D, q),
        'ffn.router.layer.weight': (E, D), 'ffn.experts.mlp.w1': (E * F, D), 'ffn.experts.mlp.v1': (E * F, D),
        'ffn.experts.mlp.w2': (E * F, D), 'ffn.gate_proj.weight': (F, D), 'ffn.up_proj.weight': (F, D),
        'ffn.down_proj.weight': (D, F),
    }
    shapes = {}
    for key in _expected_mpt_keys(arch):
        m = _BLOCK.match(key)
        shapes[key] = per_layer[m[2]] if m else {'transformer.wte.weight': (arch.vocab_size, D),
                                                 'lm_head.weight': (arch.vocab_size, D),
                                                 'transformer.norm_f.weight': (D,)}[key]
    return shapes


def check_state_dict(shapes: Mapping[str, tuple[int, ...]], arch: MPTArch) -> None:
    """ValueError naming missing, unexpected (e.g. biases) or mis-shaped tensors. shapes: stripped name -> shape."""
    expected = _expected_shapes(arch)
    extra = sorted(set(shapes) - set(expected))
    missing = sorted(set(expected) - set(shapes))
    if extra or missing:
        hint = ' (biases: the targets hold none; set no_bias: true)' if any(k.endswith('.bias') for k in extra) else ''
        if any('.ffn.' in k for k in extra + missing):
            hint += ' (dense vs MoE FFN tensors: does the recipe match the checkpoint, e.g. its upcycle block?)'
        raise ValueError(f'checkpoint does not match the model config: unexpected {extra[:6]}, '
                         f'missing {missing[:6]}{hint}')
    for key, shape in expected.items():
        if tuple(shapes[key]) != shape:
            raise ValueError(f'checkpoint: {key} has shape {tuple(shapes[key])}, the model config gives {shape} '
                             '(check d_model, n_heads, kv_n_heads, ffn_hidden_size, vocab_size, moe_num_experts)')


class _Plan:
    """Builds the target's jobs; each job reads its MPT tensor(s) only when the writer asks for them."""

    def __init__(self, source, arch: MPTArch, dtype: Optional[torch.dtype]):
        self.source, self.arch, self.dtype = source, arch, dtype
        self.names = _strip_prefix(source.specs)
        check_state_dict({k: source.specs[v].shape for k, v in self.names.items()}, arch)
        self.jobs: list[Job] = []

    def out_dtype(self, mpt: str) -> torch.dtype:
        return self.dtype or self.source.specs[self.names[mpt]].dtype

    def read(self, mpt: str) -> torch.Tensor:
        """One MPT tensor on the CPU in the output dtype (one copy at most: the cast or the device move)."""
        t = self.source.read(self.names[mpt])
        return t.to(device='cpu', dtype=self.dtype or t.dtype)

    def add(self, outputs: list[tuple[str, tuple[int, ...]]], mpt: str, produce) -> None:
        specs = tuple(TensorSpec(name, shape, self.out_dtype(mpt)) for name, shape in outputs)
        self.jobs.append(Job(specs, lambda: [t.contiguous() for t in produce(self.read(mpt))]))

    def same(self, out: str, mpt: str) -> None:
        self.add([(out, _expected_shapes(self.arch)[mpt])], mpt, lambda t: [t])

    def qkv(self, pre: str, i: int, fused_out: Optional[str]) -> None:
        """Llama q/k/v projections, or DBRX's fused Wqkv (`fused_out`), from MPT's Wqkv or Wq/Wk/Wv."""
        a, mpt = self.arch, f'transformer.blocks.{i}.attn'
        q, kv = a.n_heads * a.head_dim, a.kv_heads * a.head_dim
        if a.fused_qkv and fused_out:
            self.same(fused_out, f'{mpt}.Wqkv.weight')
        elif a.fused_qkv:
            outs = [(f'{pre}.{n}_proj.weight', (rows, a.d_model)) for n, rows in (('q', q), ('k', kv), ('v', kv))]
            self.add(outs, f'{mpt}.Wqkv.weight', lambda t: t.split([q, kv, kv], dim=0))
        elif fused_out:  # unfused MPT -> DBRX's fused Wqkv: the one job that reads three tensors
            spec = TensorSpec(fused_out, (q + 2 * kv, a.d_model), self.out_dtype(f'{mpt}.Wq.weight'))
            self.jobs.append(Job((spec,), lambda: [torch.cat([self.read(f'{mpt}.W{n}.weight') for n in 'qkv'])]))
        else:
            for n in 'qkv':
                self.same(f'{pre}.{n}_proj.weight', f'{mpt}.W{n}.weight')

    def mixtral_experts(self, pre: str, i: int) -> None:
        """MPT [E F, D] expert tensors -> Mixtral's per-expert w1 / w3 [F, D] and w2 [D, F]."""
        E, F, D = self.arch.num_experts, self.arch.ffn_hidden, self.arch.d_model
        for mb, (dense_name, transposed) in MEGABLOCKS_TO_DENSE.items():
            w = MIXTRAL_EXPERT_NAMES[dense_name]
            outs = [(f'{pre}.experts.{e}.{w}.weight', (D, F) if transposed else (F, D)) for e in range(E)]
            # [E F, D] -> E x [F, D] (-> [D, F])
            self.add(outs, f'transformer.blocks.{i}.ffn.experts.mlp.{mb}',
                     lambda t, tr=transposed: [x.t() if tr else x for x in t.reshape(E, F, D)])


def plan_export(source, arch: MPTArch, target: str, dtype: Optional[torch.dtype] = None) -> list[Job]:
    """The target's tensors as lazy jobs over an MPT source (any key prefix), in model order."""
    p = _Plan(source, arch, dtype)
    dbrx = target == 'dbrx'
    p.same('transformer.wte.weight' if dbrx else 'model.embed_tokens.weight', 'transformer.wte.weight')
    for i in range(arch.n_layers):
        mpt = f'transformer.blocks.{i}'
        if dbrx:
            pre = f'transformer.blocks.{i}'
            p.same(f'{pre}.norm_attn_norm.norm_1.weight', f'{mpt}.norm_1.weight')
            p.qkv(pre, i, fused_out=f'{pre}.norm_attn_norm.attn.Wqkv.weight')
            p.same(f'{pre}.norm_attn_norm.attn.out_proj.weight', f'{mpt}.attn.out_proj.weight')
            p.same(f'{pre}.norm_attn_norm.norm_2.weight', f'{mpt}.norm_2.weight')
            p.same(f'{pre}.ffn.router.layer.weight', f'{mpt}.ffn.router.layer.weight')
            for n in MEGABLOCKS_TO_DENSE:  # DBRX keeps the [E F, D] layout of megablocks / torch_dmoe
                p.same(f'{pre}.ffn.experts.mlp.{n}', f'{mpt}.ffn.experts.mlp.{n}')
            continue
        pre = f'model.layers.{i}'
        p.same(f'{pre}.input_layernorm.weight', f'{mpt}.norm_1.weight')
        p.qkv(f'{pre}.self_attn', i, fused_out=None)
        p.same(f'{pre}.self_attn.o_proj.weight', f'{mpt}.attn.out_proj.weight')
        p.same(f'{pre}.post_attention_layernorm.weight', f'{mpt}.norm_2.weight')
        if arch.moe:
            p.same(f'{pre}.block_sparse_moe.gate.weight', f'{mpt}.ffn.router.layer.weight')
            p.mixtral_experts(f'{pre}.block_sparse_moe', i)
        else:
            for name in MIXTRAL_EXPERT_NAMES:
                p.same(f'{pre}.mlp.{name}.weight', f'{mpt}.ffn.{name}.weight')
    p.same('transformer.norm_f.weight' if dbrx else 'model.norm.weight', 'transformer.norm_f.weight')
    if not arch.tied:
        p.same('lm_head.weight', 'lm_head.weight')
    return p.jobs


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], arch: MPTArch, target: str,
                       dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """MPT state dict (any prefix) -> the target's HF state dict, all in memory (for tests and small models)."""
    return run_jobs(plan_export(MemorySource(state_dict), arch, target, dtype))


# ---------------------------------------------------------------- writing

def _save_tokenizer(tokenizer_dir: str, out: Path, config) -> None:
    from transformers import AutoTokenizer
    src = Path(tokenizer_dir).expanduser()
    if not src.is_dir():
        raise ValueError(f'tokenizer: {tokenizer_dir} is not a directory')
    try:
        tok = AutoTokenizer.from_pretrained(str(src))
    except Exception as e:  # transformers raises OSError / ValueError / others for unreadable dirs
        raise ValueError(f'tokenizer: {tokenizer_dir} is not a loadable tokenizer directory ({e})') from None
    if len(tok) > config.vocab_size:
        raise ValueError(f'tokenizer: {tokenizer_dir} has {len(tok)} tokens, more than vocab_size={config.vocab_size}')
    tok.save_pretrained(str(out))
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id


def export_state_dict(state_dict: Mapping[str, torch.Tensor], model_cfg: Mapping[str, Any], out: str | os.PathLike,
                      target: str = 'auto', tokenizer: Optional[str] = None, overwrite: bool = False,
                      dtype: Optional[torch.dtype] = None, upcycle: Optional[Mapping[str, Any]] = None,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True,
                      allow_inexact_engines: bool = False) -> Path:
    """Writes an HF model directory (config.json, safetensors, generation config, tokenizer) atomically.

    model_cfg: the recipe's `model:` block (or MPTConfig.to_dict()); upcycle: the recipe's `upcycle:` block if
    the checkpoint was trained from a dense recipe with one. dtype: cast weights (default: keep). The tensors
    are read, converted and written one job at a time (see `export_source`).
    """
    return export_source(MemorySource(state_dict), model_cfg, out, target, tokenizer, overwrite, dtype, upcycle,
                         max_shard_bytes, progress, allow_inexact_engines)


def export_source(source, model_cfg: Mapping[str, Any], out: str | os.PathLike, target: str = 'auto',
                  tokenizer: Optional[str] = None, overwrite: bool = False, dtype: Optional[torch.dtype] = None,
                  upcycle: Optional[Mapping[str, Any]] = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                  progress: bool = True, allow_inexact_engines: bool = False) -> Path:
    """Streams an MPT tensor source (`jobs.MemorySource` / `reader.SafetensorsSource`) into an HF directory.

    Memory: one job at a time (one MPT tensor and what it becomes; the largest is one layer's [E F, D] expert
    tensor), whatever the depth. `engines.json` in the output says which serving engines compute the export
    exactly (see `engine_support`).
    """
    from transformers import GenerationConfig

    target, arch = check_target(resolve_model_config(model_cfg, upcycle), target)
    support = engine_support(arch, target, allow_inexact_engines)
    jobs = plan_export(source, arch, target, dtype)
    config = hf_config(arch, target, jobs[0].specs[0].dtype)
    with atomic_output_dir(out, tag='hf-export', overwrite=overwrite) as tmp:
        if tokenizer is not None:
            _save_tokenizer(tokenizer, tmp, config)
        write_sharded(tmp, jobs, max_shard_bytes, desc=f'exporting {target}', progress=progress)
        config.save_pretrained(str(tmp))
        GenerationConfig.from_model_config(config).save_pretrained(str(tmp))
        (tmp / ENGINES_FILE).write_text(json.dumps(support, indent=1) + '\n')
    log.info('exported %s (%d tensors) to %s', ARCHITECTURES[target], sum(len(j.specs) for j in jobs), out)
    return Path(out)


def load_recipe(path: str) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
    """(model block, upcycle block or None) of a foundry YAML recipe, with ${...} variables resolved."""
    from foundry_upcycle.recipes import load_recipe as load_full_recipe
    cfg = load_full_recipe(str(Path(path).expanduser()))
    if not isinstance(cfg, dict) or not isinstance(cfg.get('model'), dict):
        raise ValueError(f'config: {path} has no `model:` block')
    return cfg['model'], cfg.get('upcycle')


def export_checkpoint(checkpoint: str, config: str, out: str, target: str = 'auto', tokenizer: Optional[str] = None,
                      overwrite: bool = False, dtype: Optional[torch.dtype] = None,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True,
                      allow_inexact_engines: bool = False) -> Path:
    """Composer checkpoint (or state dict / safetensors) + YAML recipe -> HF directory, streamed: a torch file is
    memory-mapped (its optimizer state is never read), a safetensors file read tensor by tensor."""
    model_cfg, upcycle = load_recipe(config)
    resolved, arch = check_target(resolve_model_config(model_cfg, upcycle), target)
    engine_support(arch, resolved, allow_inexact_engines)  # fail before reading a large checkpoint
    return export_source(open_source(checkpoint), model_cfg, out, target, tokenizer, overwrite, dtype, upcycle,
                         max_shard_bytes, progress, allow_inexact_engines)


def mpt_config_dict(config: Any) -> dict[str, Any]:
    """The architecture keys of a live MPTConfig (drops PretrainedConfig's generation and bookkeeping fields)."""
    raw = config.to_dict()
    keep = set(MPT_DEFAULTS) | {'attn_config', 'ffn_config'}
    return {k: v for k, v in raw.items() if k in keep}
