"""Which HF target an MPT model can be exported to exactly (transformers, and vLLM per `engines.json`), and the
target's transformers config. Targets: llama / mistral (dense), mixtral (RMSNorm MoE), dbrx (LayerNorm MoE).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping

import torch

from foundry_upcycle.export.mpt_arch import MPTArch, parse_mpt_config
from foundry_upcycle.export.targets import ARCHITECTURES, TARGETS, engines_record

log = logging.getLogger(__name__)


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
