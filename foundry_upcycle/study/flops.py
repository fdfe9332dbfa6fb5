"""Parameter counts and training FLOPs per token of an MPT model config (a foundry YAML `model:` block) or of a
transformers config (a `config.json` dict with `model_type`: Llama / Mistral / Mixtral, the real-base study).

Pure Python: reads the config dict only, builds nothing. Defaults follow llmfoundry 0.22's `MPTConfig`.

Per-token training FLOPs (the paper's accounting, also Kaplan et al. / Chinchilla):
    6 * (active non-embedding params + LM head [V*D]) + 12 * L * S * D_attn
with L layers, S the sequence length, D_attn = n_heads * head_dim (= d_model unless head_dim is set).
"Active" counts top_k of the E experts (plus the router) in each MoE layer. At matched training FLOPs
the MoE arm therefore sees fewer tokens than the dense (CPT) arm: tokens_moe / tokens_dense = fpt_dense / fpt_moe.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from foundry_upcycle.shapes import ParamCount, hf_param_count

# llmfoundry.models.mpt.MPTConfig defaults (and models/utils/config_defaults.py).
MPT_DEFAULTS: dict[str, Any] = {
    'd_model': 2048,
    'n_heads': 16,
    'n_layers': 24,
    'head_dim': None,
    'expansion_ratio': 4,
    'max_seq_len': 2048,
    'vocab_size': 50368,
    'learned_pos_emb': True,
    'no_bias': False,
    'attention_bias': None,
    'norm_type': 'low_precision_layernorm',
    'tie_word_embeddings': True,
}
DENSE_FFNS = {'mptmlp': 2, 'mptglu': 3}            # weight matrices per FFN
MOE_FFNS = ('torch_dmoe', 'mb_dmoe', 'mb_moe')
MOE_MATRICES = {'mlp': 2, 'glu': 3}


@dataclass(frozen=True)
class ParamBreakdown(ParamCount):
    """Parameter counts of one MPT config (`total`/`active` from the project's one counter), plus what the FLOP
    formula needs besides them. `embedding` includes wpe when learned positions are used."""
    head_matmul: int = 0    # V * D: the LM head's multiply-adds per token, tied or not
    attn_width: int = 0     # n_heads * head_dim
    vocab_size: int = 0
    d_model: int = 0

    @property
    def active_non_embedding(self) -> int:
        return self.active - self.embedding - self.lm_head


def _get(cfg: Mapping[str, Any], key: str) -> Any:
    return cfg[key] if cfg.get(key) is not None else MPT_DEFAULTS[key]


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'{name} must be a positive integer, got {value!r}')
    return value


def _norm_params(cfg: Mapping[str, Any], width: int) -> int:
    # LayerNorm has weight and bias, RMSNorm a weight only; MPTModel drops every non-Linear bias under no_bias.
    has_bias = 'rmsnorm' not in _get(cfg, 'norm_type').lower() and not _get(cfg, 'no_bias')
    return width * (1 + has_bias)


def _kv_heads(attn: Mapping[str, Any], n_heads: int) -> int:
    attn_type = attn.get('attn_type', 'multihead_attention')
    if attn_type == 'multihead_attention':
        return n_heads
    if attn_type == 'multiquery_attention':
        return 1
    if attn_type == 'grouped_query_attention':
        if attn.get('kv_n_heads') is None:
            raise ValueError('model.attn_config.kv_n_heads is required with attn_type grouped_query_attention')
        return _positive_int(attn['kv_n_heads'], 'model.attn_config.kv_n_heads')
    raise ValueError(f'model.attn_config.attn_type {attn_type!r} is not supported by the FLOP count')


def _attention_params(cfg: Mapping[str, Any], d_model: int) -> tuple[int, int]:
    """(params of one attention layer incl. qk norms, n_heads * head_dim)."""
    attn = cfg.get('attn_config') or {}
    if attn.get('kv_dim') is not None:
        raise ValueError('model.attn_config.kv_dim (cross attention) is not supported by the FLOP count')
    n_heads = _positive_int(_get(cfg, 'n_heads'), 'model.n_heads')
    head_dim = cfg.get('head_dim') or d_model // n_heads
    kv = _kv_heads(attn, n_heads)
    no_bias = bool(_get(cfg, 'no_bias'))
    qkv_bias = cfg.get('attention_bias')
    qkv_bias = (not no_bias) if qkv_bias is None else bool(qkv_bias)
    q_out, kv_out = n_heads * head_dim, kv * head_dim
    params = d_model * (q_out + 2 * kv_out) + (q_out + 2 * kv_out) * qkv_bias     # Wqkv (fused or not)
    params += q_out * d_model + d_model * (not no_bias)                            # out_proj
    if attn.get('qk_ln'):
        params += _norm_params(cfg, q_out) + _norm_params(cfg, kv_out)
    elif attn.get('qk_gn'):
        params += 2 * _norm_params(cfg, head_dim)
    return params, q_out


def _ffn_hidden(cfg: Mapping[str, Any], ffn: Mapping[str, Any], d_model: int) -> int:
    if ffn.get('ffn_hidden_size') is not None:
        return _positive_int(ffn['ffn_hidden_size'], 'model.ffn_config.ffn_hidden_size')
    hidden = d_model * _get(cfg, 'expansion_ratio')
    if int(hidden) != hidden:
        raise ValueError(f'model.d_model * model.expansion_ratio must be an integer, got {hidden}')
    return int(hidden)


def _ffn_params(cfg: Mapping[str, Any], d_model: int, ffn_key: str = 'ffn_config') -> tuple[int, int, int, int]:
    """(shared params per layer, params per expert, num_experts, top_k) of one FFN layer (`ffn_key`'s config)."""
    ffn = cfg.get(ffn_key) or {'ffn_type': 'mptmlp'}
    ffn_type = ffn.get('ffn_type', 'mptmlp')
    hidden = _ffn_hidden(cfg, ffn, d_model)
    bias = not _get(cfg, 'no_bias')
    if ffn_type in DENSE_FFNS:
        n_mat = DENSE_FFNS[ffn_type]
        return 0, n_mat * hidden * d_model + bias * ((n_mat - 1) * hidden + d_model), 1, 1
    if ffn_type not in MOE_FFNS:
        raise ValueError(f'model.ffn_config.ffn_type {ffn_type!r} is not supported by the FLOP count; '
                         f'supported: {sorted(DENSE_FFNS) + list(MOE_FFNS)}')
    for key in ('moe_num_experts', 'moe_top_k'):
        if ffn.get(key) is None:
            raise ValueError(f'model.ffn_config.{key} must be set for ffn_type {ffn_type}')
    experts = _positive_int(ffn['moe_num_experts'], 'model.ffn_config.moe_num_experts')
    top_k = _positive_int(ffn['moe_top_k'], 'model.ffn_config.moe_top_k')
    if top_k > experts:
        raise ValueError(f'model.ffn_config.moe_top_k={top_k} exceeds moe_num_experts={experts}')
    mlp_type = ffn.get('mlp_type', 'mlp')
    if mlp_type not in MOE_MATRICES:
        raise ValueError(f'model.ffn_config.mlp_type must be one of {sorted(MOE_MATRICES)}, got {mlp_type!r}')
    router = experts * d_model                      # router.layer: Linear(D, E, bias=False)
    # torch_dmoe holds no biases; megablocks adds one output bias of size D when bias is on.
    shared = router + (d_model if bias and ffn_type != 'torch_dmoe' else 0)
    return shared, MOE_MATRICES[mlp_type] * hidden * d_model, experts, top_k


def _hf_breakdown(config: Mapping[str, Any]) -> ParamBreakdown:
    """A transformers config: Llama / Mistral (dense) or Mixtral; the one counter's `hf_param_count`."""
    if config.get('model_type') not in ('llama', 'mistral', 'mixtral'):
        raise ValueError(f'config.json model_type {config.get("model_type")!r} is not supported by the FLOP count '
                         '(llama, mistral, mixtral)')
    c = hf_param_count(config)
    d, heads = int(config['hidden_size']), int(config['num_attention_heads'])
    head_dim = int(config.get('head_dim') or d // heads)
    fields = {f: getattr(c, f) for f in ParamCount.__dataclass_fields__}
    return ParamBreakdown(**fields, head_matmul=int(config['vocab_size']) * d, attn_width=heads * head_dim,
                          vocab_size=int(config['vocab_size']), d_model=d)


def param_breakdown(model_cfg: Mapping[str, Any]) -> ParamBreakdown:
    """Parameter counts of an MPT `model:` config or a transformers config.json dict (it has `model_type`), or
    ValueError naming the key it cannot count."""
    if not isinstance(model_cfg, Mapping):
        raise ValueError(f'model config must be a mapping, got {type(model_cfg).__name__}')
    if 'model_type' in model_cfg:
        return _hf_breakdown(model_cfg)
    if model_cfg.get('block_overrides'):
        raise ValueError('model.block_overrides is not supported by the FLOP count (it changes per-layer shapes)')
    d_model = _positive_int(_get(model_cfg, 'd_model'), 'model.d_model')
    n_layers = _positive_int(_get(model_cfg, 'n_layers'), 'model.n_layers')
    vocab = _positive_int(_get(model_cfg, 'vocab_size'), 'model.vocab_size')
    attn = model_cfg.get('attn_config') or {}
    learned_pos = bool(_get(model_cfg, 'learned_pos_emb')) and not (attn.get('alibi') or attn.get('rope'))
    embedding = vocab * d_model + (_get(model_cfg, 'max_seq_len') * d_model if learned_pos else 0)
    tied = bool(_get(model_cfg, 'tie_word_embeddings'))
    attn_params, attn_width = _attention_params(model_cfg, d_model)
    ffn_shared, per_expert, experts, top_k = _ffn_params(model_cfg, d_model)
    dense_layers, dense_layer = _dense_layers(model_cfg, d_model, n_layers, experts)
    return ParamBreakdown(
        embedding=embedding,
        lm_head=0 if tied else vocab * d_model,
        head_matmul=vocab * d_model,
        per_layer_shared=2 * _norm_params(model_cfg, d_model) + attn_params + ffn_shared,
        per_expert=per_expert,
        num_experts=experts,
        top_k=top_k,
        n_layers=n_layers,
        final_norm=_norm_params(model_cfg, d_model),
        dense_layers=dense_layers,
        dense_layer=dense_layer + 2 * _norm_params(model_cfg, d_model) + attn_params,
        attn_width=attn_width,
        vocab_size=vocab,
        d_model=d_model,
    )


def _dense_layers(cfg: Mapping[str, Any], d_model: int, n_layers: int, experts: int) -> tuple[int, int]:
    """(blocks with a dense FFN, that FFN's params) of an MoE on some blocks only (`moe_layers` +
    `dense_ffn_config`, mpt_upcycle_causal_lm); (0, 0) otherwise."""
    moe_layers = cfg.get('moe_layers')
    if moe_layers is None:
        return 0, 0
    if experts == 1 or not isinstance(moe_layers, (list, tuple)) or any(
            isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_layers for i in moe_layers):
        raise ValueError(f'model.moe_layers must list MoE blocks of an MoE model (0..{n_layers - 1}), '
                         f'got {moe_layers!r}')
    shared, per_expert, e, _ = _ffn_params(cfg, d_model, 'dense_ffn_config')
    if e != 1:
        raise ValueError('model.dense_ffn_config must be a dense FFN (mptglu / mptmlp)')
    return n_layers - len(set(moe_layers)), shared + per_expert


def param_counts(model_cfg: Mapping[str, Any]) -> tuple[int, int]:
    """(total, active) parameters; they differ only for an MoE (active counts top_k experts per layer).
    Counted by the project's one counter, `foundry_upcycle.shapes.ParamCount`."""
    b = param_breakdown(model_cfg)
    return b.total, b.active


def train_flops_per_token(model_cfg: Mapping[str, Any], seq_len: int) -> float:
    """Training FLOPs per token: 6 * (active non-embedding + V*D) + 12 * L * seq_len * D_attn."""
    seq_len = _positive_int(seq_len, 'seq_len')
    b = param_breakdown(model_cfg)
    return 6.0 * (b.active_non_embedding + b.head_matmul) + 12.0 * b.n_layers * seq_len * b.attn_width


def token_ratio(dense_cfg: Mapping[str, Any], moe_cfg: Mapping[str, Any], seq_len: int) -> float:
    """Upcycled (MoE) tokens / CPT (dense) tokens at matched training FLOPs."""
    return train_flops_per_token(dense_cfg, seq_len) / train_flops_per_token(moe_cfg, seq_len)


def _check_budget(budget_fraction: float, pretrain_tokens: int) -> None:
    if isinstance(budget_fraction, bool) or not isinstance(budget_fraction, (int, float)) \
            or not math.isfinite(budget_fraction) or budget_fraction <= 0:
        raise ValueError(f'budget fraction must be a number > 0, got {budget_fraction!r}')
    _positive_int(pretrain_tokens, 'pretrain_tokens')


def matched_tokens(dense_cfg: Mapping[str, Any], moe_cfg: Mapping[str, Any], budget_fraction: float,
                   pretrain_tokens: int, seq_len: int) -> tuple[int, int]:
    """(cpt_tokens, upcycle_tokens) that each spend `budget_fraction` x the dense pretraining FLOPs.

    Rounded down, so neither arm exceeds the budget.
    """
    _check_budget(budget_fraction, pretrain_tokens)
    dense_fpt = train_flops_per_token(dense_cfg, seq_len)
    budget = budget_fraction * pretrain_tokens * dense_fpt
    return math.floor(budget / dense_fpt + 1e-9), math.floor(budget / train_flops_per_token(moe_cfg, seq_len))


def matched_steps(dense_cfg: Mapping[str, Any], moe_cfg: Mapping[str, Any], budget_fraction: float,
                  pretrain_tokens: int, seq_len: int, tokens_per_step: int) -> tuple[int, int]:
    """(cpt_steps, upcycle_steps) at `tokens_per_step` (global batch x seq_len) each: the whole number of steps
    nearest to the budget's FLOPs, so each arm is within half a step of the budget (at least 1 step). The one
    function that turns a budget into steps (the study's plan calls it)."""
    tokens_per_step = _positive_int(tokens_per_step, 'tokens_per_step')
    _check_budget(budget_fraction, pretrain_tokens)
    dense_fpt = train_flops_per_token(dense_cfg, seq_len)
    budget = budget_fraction * pretrain_tokens * dense_fpt
    return tuple(max(1, round(budget / (fpt * tokens_per_step)))
                 for fpt in (dense_fpt, train_flops_per_token(moe_cfg, seq_len)))
