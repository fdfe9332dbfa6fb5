"""Parameter counting: the one counter (total and active parameters) every part of the project uses. Pure Python.

A model is counted from its parts: embedding, LM head, per-layer parameters shared by all experts (norms,
attention, router), one expert's FFN, E experts of which K are active per token, L layers, final norm; with an MoE
on some blocks only, `dense_layers` of the L layers hold a dense FFN instead (`dense_layer` parameters each, norms
and attention included). Fine-grained experts are just more, narrower experts (E*G of width F/G, K*G active).
`study.flops.param_counts` (MPT configs), the benchmark's `ModelShape` (Llama / Mixtral shapes) and its
measured models (`hf_param_count`, from a transformers config) all go through `ParamCount`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional


@dataclass(frozen=True)
class ParamCount:
    embedding: int
    lm_head: int            # 0 when tied to the embedding
    per_layer_shared: int   # norms, attention, router
    per_expert: int         # one expert's FFN (the whole FFN of a dense model)
    num_experts: int        # 1 for a dense FFN
    top_k: int              # 1 for a dense FFN
    n_layers: int
    final_norm: int
    dense_layers: int = 0   # of the n_layers, how many keep a dense FFN (MoE on some blocks only)
    dense_layer: int = 0    # parameters of one such layer (norms, attention, dense FFN)

    @property
    def moe_layers(self) -> int:
        return self.n_layers - self.dense_layers

    @property
    def total(self) -> int:
        per_layer = self.per_layer_shared + self.num_experts * self.per_expert
        return (self.embedding + self.lm_head + self.moe_layers * per_layer + self.dense_layers * self.dense_layer
                + self.final_norm)

    @property
    def active(self) -> int:
        return self.total - self.moe_layers * (self.num_experts - self.top_k) * self.per_expert


def llama_param_count(d_model: int, n_layers: int, ffn_hidden: int, n_heads: int, n_kv_heads: int, vocab_size: int,
                      num_experts: int = 1, top_k: int = 1, tied: bool = False,
                      head_dim: Optional[int] = None) -> ParamCount:
    """A Llama / Mistral (num_experts 1) or Mixtral / DBRX model: bias-free, one weight per norm, SiLU-GLU FFN."""
    hd = head_dim or d_model // n_heads
    attn = d_model * (n_heads + 2 * n_kv_heads) * hd + n_heads * hd * d_model
    router = d_model * num_experts if num_experts > 1 else 0
    return ParamCount(embedding=vocab_size * d_model, lm_head=0 if tied else vocab_size * d_model,
                      per_layer_shared=attn + router + 2 * d_model, per_expert=3 * d_model * ffn_hidden,
                      num_experts=num_experts, top_k=top_k if num_experts > 1 else 1, n_layers=n_layers,
                      final_norm=d_model)


def hf_param_count(config: Mapping[str, Any], top_k: Optional[int] = None) -> ParamCount:
    """From a transformers config (config.json as a dict): Llama, Mistral, Mixtral or DBRX. top_k: the routing
    served (default: the config's)."""
    if config.get('model_type') == 'dbrx':
        attn, ffn = config.get('attn_config') or {}, config.get('ffn_config') or {}
        e = int(ffn.get('moe_num_experts', 1))
        return llama_param_count(config['d_model'], config['n_layers'], ffn['ffn_hidden_size'], config['n_heads'],
                                 attn.get('kv_n_heads', 1), config['vocab_size'], e,
                                 top_k or int(ffn.get('moe_top_k', 1)), tied=False)
    e = int(config.get('num_local_experts') or 1)
    return llama_param_count(config['hidden_size'], config['num_hidden_layers'], config['intermediate_size'],
                             config['num_attention_heads'], config.get('num_key_value_heads') or
                             config['num_attention_heads'], config['vocab_size'], e,
                             top_k or int(config.get('num_experts_per_tok') or 1),
                             tied=bool(config.get('tie_word_embeddings', False)), head_dim=config.get('head_dim'))


def _positive_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


@dataclass(frozen=True)
class ModelShape:
    """A Llama-like dense model (RMSNorm, rope, GQA, SiLU-GLU, untied embeddings) and its E-expert MoE."""

    d_model: int
    n_layers: int
    ffn_hidden: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    num_experts: int = 8

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if not _positive_int(getattr(self, f.name)):
                raise ValueError(f'shape.{f.name} must be a positive integer, got {getattr(self, f.name)!r}')
        if self.d_model % self.n_heads:
            raise ValueError(f'shape.n_heads={self.n_heads} must divide d_model={self.d_model}')
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f'shape.n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}')
        if self.num_experts < 2:
            raise ValueError(f'shape.num_experts must be >= 2, got {self.num_experts}')

    def count(self, moe: bool = False, top_k: int = 2) -> ParamCount:
        return llama_param_count(self.d_model, self.n_layers, self.ffn_hidden, self.n_heads, self.n_kv_heads,
                                 self.vocab_size, self.num_experts if moe else 1, top_k)

    def params(self, moe: bool = False) -> int:
        """Parameter count of the dense model, or of its MoE (all experts, routers included)."""
        return self.count(moe).total


# Paper shapes (REFERENCE.md): 16 heads / 4 KV heads, GPT-4 tokenizer (padded vocab), 8 experts.
SHAPES = {
    'tiny': ModelShape(d_model=64, n_layers=2, ffn_hidden=160, n_heads=4, n_kv_heads=2, vocab_size=256),
    '436m': ModelShape(d_model=1024, n_layers=22, ffn_hidden=2560, n_heads=16, n_kv_heads=4, vocab_size=100352),
    '1.4b': ModelShape(d_model=2048, n_layers=24, ffn_hidden=5120, n_heads=16, n_kv_heads=4, vocab_size=100352),
}
