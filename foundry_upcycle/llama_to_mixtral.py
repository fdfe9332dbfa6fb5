"""The Hugging Face mapping: a dense Llama / Mistral -> its upcycled Mixtral, as a plan of tensor jobs.

Used by `foundry-upcycle import-hf` (streamed to disk) and by the `hf_upcycle_causal_lm` model's loader (streamed
into the training model at BEFORE_LOAD); the weight math is `weights.py`. Families Mixtral cannot represent
exactly are refused with the architecture and the config key. Imports torch (transformers lazily, for configs).

Shapes: D hidden_size, F intermediate_size, E experts, G granularity (N = E*G experts of width f = F/G).
  dense  model.layers.{i}.mlp.gate_proj / up_proj [F, D], down_proj [D, F]
  MoE    model.layers.{i}.block_sparse_moe.gate [N, D], experts.{j}.w1 = gate, w3 = up [f, D], w2 = down [D, f]
Variants: granularity and drop_ratio map as in `weights.py`; grow maps a Mixtral to a Mixtral with m times the
experts (`mixtral_grow_jobs`); moe_layers other than every block is refused (Mixtral holds an MoE in every block).
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from foundry_upcycle.jobs import Job, TensorSpec
from foundry_upcycle.moe_layers import moe_layer_indices
from foundry_upcycle.weights import UpcycleWeights, expert_matrix, grown_rows, router_weight

log = logging.getLogger(__name__)

SOURCE_TYPES = ('llama', 'mistral')
# Why other families are refused (model_type: the config key and what Mixtral lacks).
_REFUSED = {
    'qwen2': 'attention q/k/v biases (Qwen2 always has them; Mixtral holds none)',
    'qwen3': 'q/k RMSNorms in attention (q_norm, k_norm), which Mixtral lacks',
    'gemma': 'hidden_activation GELU-tanh, RMSNorm scaled by (1 + weight) and a sqrt(hidden_size) embedding scale',
    'gemma2': 'RMSNorm scaled by (1 + weight), logit soft-capping and extra pre/post-FFN norms',
    'phi3': 'fused qkv_proj and gate_up_proj tensors and partial rotary embeddings',
    'olmo2': 'q/k RMSNorms and norms after (not before) each sub-layer',
}
_ROLES = {'gate_proj': ('gate', 'w1'), 'up_proj': ('up', 'w3'), 'down_proj': ('down', 'w2')}
_PASS_LAYER = ('input_layernorm.weight', 'self_attn.q_proj.weight', 'self_attn.k_proj.weight',
               'self_attn.v_proj.weight', 'self_attn.o_proj.weight', 'post_attention_layernorm.weight')
_IGNORED = re.compile(r'\.rotary_emb\.inv_freq$')  # written by old transformers versions; recomputed on load


def read_dense_config(directory: str | Path, what: str = 'src') -> dict[str, Any]:
    """config.json of a dense HF model directory (as a dict, defaults filled in), checked to be a family Mixtral represents exactly."""
    path = Path(directory).expanduser() / 'config.json'
    if not path.is_file():
        raise ValueError(f'{what}: {directory} has no config.json; expected a Hugging Face model directory')
    raw = json.loads(path.read_text())
    check_dense_config(raw, what)
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(str(path.parent)).to_dict()  # with the family's defaults filled in


def check_dense_config(raw: Mapping[str, Any], what: str = 'src') -> None:
    """ValueError naming the architecture and the config key, for anything Mixtral cannot compute exactly."""
    arch = (raw.get('architectures') or ['?'])[0]
    model_type = raw.get('model_type')
    if model_type not in SOURCE_TYPES:
        why = _REFUSED.get(model_type, 'not a Llama-family layout')
        raise ValueError(f'{what}: config.json model_type {model_type!r} ({arch}) cannot be upcycled into Mixtral '
                         f'exactly: {why}; supported model_type: {list(SOURCE_TYPES)}')
    for key in ('attention_bias', 'mlp_bias'):
        if raw.get(key):
            raise ValueError(f'{what}: {arch} config.json {key}=true: Mixtral holds no biases')
    if raw.get('pretraining_tp', 1) not in (1, None):
        log.info('%s: pretraining_tp=%s is ignored by transformers\' forward (and so here)', what, raw['pretraining_tp'])


def expected_dense(cfg: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The dense model's tensor shapes, from config.json."""
    D, F, V = cfg['hidden_size'], cfg['intermediate_size'], cfg['vocab_size']
    hd = cfg.get('head_dim') or D // cfg['num_attention_heads']
    q, kv = cfg['num_attention_heads'] * hd, (cfg.get('num_key_value_heads') or cfg['num_attention_heads']) * hd
    layer = {'input_layernorm.weight': (D,), 'post_attention_layernorm.weight': (D,),
             'self_attn.q_proj.weight': (q, D), 'self_attn.k_proj.weight': (kv, D), 'self_attn.v_proj.weight': (kv, D),
             'self_attn.o_proj.weight': (D, q), 'mlp.gate_proj.weight': (F, D), 'mlp.up_proj.weight': (F, D),
             'mlp.down_proj.weight': (D, F)}
    out = {'model.embed_tokens.weight': (V, D), 'model.norm.weight': (D,)}
    if not cfg.get('tie_word_embeddings', False):
        out['lm_head.weight'] = (V, D)
    for i in range(cfg['num_hidden_layers']):
        out.update({f'model.layers.{i}.{k}': s for k, s in layer.items()})
    return out


def check_tensors(specs: Mapping[str, TensorSpec], cfg: Mapping[str, Any], what: str = 'src') -> dict[str, TensorSpec]:
    """The dense tensors to map (inv_freq buffers and a saved tied head dropped), checked against config.json."""
    ignored = sorted(k for k in specs if _IGNORED.search(k))
    if ignored:
        log.info('skipping %d rotary inv_freq buffers (recomputed on load)', len(ignored))
    specs = {k: v for k, v in specs.items() if k not in ignored}
    if cfg.get('tie_word_embeddings', False) and 'lm_head.weight' in specs:
        specs.pop('lm_head.weight')  # a tied head saved anyway: the embedding is its single source
    expected = expected_dense(cfg)
    extra, missing = sorted(set(specs) - set(expected)), sorted(set(expected) - set(specs))
    if extra or missing:
        raise ValueError(f'{what}: tensors do not match a dense {cfg["model_type"]} with this config.json: '
                         f'unexpected {extra[:5]}, missing {missing[:5]}')
    for name, shape in expected.items():
        if specs[name].shape != shape:
            raise ValueError(f'{what}: {name} has shape {specs[name].shape}, config.json gives {shape}')
    return specs


def check_mixtral_options(opts: UpcycleWeights, n_layers: int, what: str = 'upcycle') -> None:
    """ValueError naming the key for a variant Mixtral cannot hold: dense blocks among MoE blocks."""
    moe = moe_layer_indices(opts.moe_layers, n_layers, f'{what}.moe_layers')
    if len(moe) < n_layers:
        raise ValueError(f'{what}.moe_layers={opts.moe_layers!r}: Mixtral holds a mixture of experts in every block, '
                         f'so it cannot keep blocks {sorted(set(range(n_layers)) - set(moe))} dense (the MPT path can)')


def mixtral_jobs(source, cfg: Mapping[str, Any], opts: UpcycleWeights, out_prefix: str = '',
                 what: str = 'src') -> list[Job]:
    """The Mixtral's tensors as lazy jobs over a dense source, in model order: embedding, then per layer attention,
    router and experts, then norm and head. A job per dense MLP matrix yields its E*G experts one at a time."""
    specs = check_tensors(source.specs, cfg, what)
    check_mixtral_options(opts, cfg['num_hidden_layers'])
    assert opts.grow == 1 and cfg['intermediate_size'] % opts.granularity == 0, 'read_source_config checks these'
    E, D = opts.num_experts * opts.granularity, cfg['hidden_size']
    dtype = specs['model.embed_tokens.weight'].dtype

    def passthrough(name: str) -> Job:
        s = specs[name]
        return Job((TensorSpec(out_prefix + name, s.shape, s.dtype),), lambda: [source.read(name)])

    def experts(i: int, dense: str) -> Job:
        name, (role, w) = f'model.layers.{i}.mlp.{dense}.weight', _ROLES[dense]
        s = specs[name]
        shape = (s.shape[0], s.shape[1] // opts.granularity) if role == 'down' else \
            (s.shape[0] // opts.granularity, s.shape[1])
        out = tuple(TensorSpec(f'{out_prefix}model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight', shape,
                               s.dtype) for e in range(E))

        def produce():
            weight = source.read(name)
            if role == 'down':  # [D, F] -> [F, D] for the math, each expert back to [D, f]
                yield from (expert_matrix(weight.t(), opts, i, role, e).t().contiguous() for e in range(E))
            else:
                yield from (expert_matrix(weight, opts, i, role, e) for e in range(E))
        return Job(out, produce)

    jobs = [passthrough('model.embed_tokens.weight')]
    for i in range(cfg['num_hidden_layers']):
        jobs += [passthrough(f'model.layers.{i}.{rest}') for rest in _PASS_LAYER]
        gate = TensorSpec(f'{out_prefix}model.layers.{i}.block_sparse_moe.gate.weight', (E, D), dtype)
        jobs.append(Job((gate,), lambda i=i: [router_weight(opts, i, D, dtype)]))
        jobs += [experts(i, dense) for dense in _ROLES]
    jobs.append(passthrough('model.norm.weight'))
    if 'lm_head.weight' in specs:
        jobs.append(passthrough('lm_head.weight'))
    return jobs


def mixtral_grow_jobs(source, cfg: Mapping[str, Any], opts: UpcycleWeights, out_prefix: str = '',
                      what: str = 'src') -> list[Job]:
    """A Mixtral grown m-fold (`opts.grow`), in the source's order: new expert j is source expert j // m, the
    router's rows repeated m times; everything else passes through. Exact with top-k raised m-fold."""
    n = int(cfg['num_local_experts'])
    want = opts.num_experts * opts.granularity
    if n != want:
        raise ValueError(f'{what}: the Mixtral has {n} experts, but upcycle.num_experts x granularity = {want}: with '
                         'grow, the block describes the model being grown')
    check_mixtral_options(opts, cfg['num_hidden_layers'])
    expert = re.compile(r'^(?P<pre>.*\.block_sparse_moe\.experts\.)(?P<e>\d+)(?P<post>\.w[123]\.weight)$')
    jobs = []
    for name, spec in source.specs.items():
        if _IGNORED.search(name):
            continue
        m = expert.match(name)
        if m is not None:
            e = int(m['e'])
            outs = tuple(TensorSpec(f'{out_prefix}{m["pre"]}{e * opts.grow + c}{m["post"]}', spec.shape, spec.dtype)
                         for c in range(opts.grow))
            jobs.append(Job(outs, lambda name=name: [source.read(name)] * opts.grow))
        elif name.endswith('.block_sparse_moe.gate.weight'):
            shape = (spec.shape[0] * opts.grow, *spec.shape[1:])
            jobs.append(Job((TensorSpec(out_prefix + name, shape, spec.dtype),),
                            lambda name=name: [grown_rows(source.read(name), n, opts.grow)]))
        else:
            jobs.append(Job((TensorSpec(out_prefix + name, spec.shape, spec.dtype),),
                            lambda name=name: [source.read(name)]))
    return jobs


def read_source_config(path: str | Path, opts: UpcycleWeights, what: str = 'src') -> dict[str, Any]:
    """config.json of the HF directory to upcycle (dense Llama / Mistral) or, with grow > 1, to grow (Mixtral),
    checked against the variants: ValueError naming the key for what Mixtral cannot hold."""
    raw_path = Path(path).expanduser() / 'config.json'
    model_type = json.loads(raw_path.read_text()).get('model_type') if raw_path.is_file() else None
    if model_type == 'mixtral':
        if opts.grow == 1:
            raise ValueError(f'{what} is already a Mixtral: set upcycle.grow to add experts to it')
        from transformers import AutoConfig
        cfg = AutoConfig.from_pretrained(str(raw_path.parent)).to_dict()
    else:
        cfg = read_dense_config(path, what)
        if opts.grow > 1:
            raise ValueError(f'upcycle.grow={opts.grow}: {what} is a dense {cfg["model_type"]}; grow adds experts to a '
                             'Mixtral (drop grow to upcycle a dense model)')
        if cfg['intermediate_size'] % opts.granularity:
            raise ValueError(f'upcycle.granularity={opts.granularity} must divide intermediate_size '
                             f'{cfg["intermediate_size"]} of {what}')
    check_mixtral_options(opts, cfg['num_hidden_layers'])
    return cfg


def hf_upcycle_jobs(path: str | Path, source, opts: UpcycleWeights, out_prefix: str = '',
                    what: str = 'src') -> tuple[list[Job], dict[str, Any]]:
    """(jobs, source config) for the HF model directory `path`: a dense Llama / Mistral upcycled into Mixtral, or
    (grow > 1) a Mixtral grown. The one entry point of the `hf_upcycle_causal_lm` loader and `import-hf`."""
    cfg = read_source_config(path, opts, what)
    if cfg['model_type'] == 'mixtral':
        return mixtral_grow_jobs(source, cfg, opts, out_prefix, what), cfg
    return mixtral_jobs(source, cfg, opts, out_prefix, what), cfg


def upcycled_mixtral_config(source_cfg: Mapping[str, Any], num_experts: int, top_k: int, granularity: int,
                            grow: int, load_balancing_loss_weight: float, dtype: Any = None):
    """The MixtralConfig of `hf_upcycle_jobs`' output: from a dense config, E*G experts of width F/G routing
    top-(k*G); from a Mixtral config (grow), m times its experts and its top-k."""
    if source_cfg.get('model_type') == 'mixtral':
        return mixtral_config(source_cfg, int(source_cfg['num_local_experts']) * grow,
                              int(source_cfg['num_experts_per_tok']) * grow, load_balancing_loss_weight, dtype)
    return mixtral_config(source_cfg, num_experts * granularity * grow, top_k * granularity * grow,
                          load_balancing_loss_weight, dtype,
                          intermediate_size=source_cfg['intermediate_size'] // granularity)



def mixtral_config(dense: Mapping[str, Any], num_experts: int, top_k: int, load_balancing_loss_weight: float,
                   dtype: Any = None, intermediate_size: int | None = None):
    """MixtralConfig with the dense model's shapes (rope, norm eps, tied embeddings, sliding window, GQA) and
    `num_experts` copies, set up for serving: no router logits, so `generate` works with a KV cache; the
    load-balancing weight is stored as `router_aux_loss_coef` for training, which turns the router logits on."""
    from transformers import MixtralConfig
    extra = {}
    if dense.get('rope_scaling') is not None:
        extra['rope_scaling'] = dense['rope_scaling']  # transformers' Mixtral reads it like Llama's
    heads = dense['num_attention_heads']
    return MixtralConfig(
        vocab_size=dense['vocab_size'], hidden_size=dense['hidden_size'],
        intermediate_size=intermediate_size or dense['intermediate_size'],
        num_hidden_layers=dense['num_hidden_layers'], num_attention_heads=heads,
        num_key_value_heads=dense.get('num_key_value_heads') or heads,
        head_dim=dense.get('head_dim') or dense['hidden_size'] // heads,
        hidden_act=dense.get('hidden_act', 'silu'), max_position_embeddings=dense.get('max_position_embeddings', 2048),
        rms_norm_eps=dense.get('rms_norm_eps', 1e-6), rope_theta=dense.get('rope_theta', 10000.0),
        sliding_window=dense.get('sliding_window'), attention_dropout=dense.get('attention_dropout', 0.0),
        tie_word_embeddings=dense.get('tie_word_embeddings', False), bos_token_id=dense.get('bos_token_id'),
        eos_token_id=dense.get('eos_token_id'), pad_token_id=dense.get('pad_token_id'),
        num_local_experts=num_experts, num_experts_per_tok=top_k, output_router_logits=False,
        router_aux_loss_coef=load_balancing_loss_weight, router_jitter_noise=0.0, torch_dtype=dtype,
        architectures=['MixtralForCausalLM'], **extra,
    )


def torch_dtype(specs: Mapping[str, TensorSpec]) -> torch.dtype:
    return specs['model.embed_tokens.weight'].dtype
