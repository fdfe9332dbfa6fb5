"""The models a benchmark serves: Hugging Face directories, one per (model, top-k).

Synthetic models are a random Llama from a `ModelShape`, saved, and its upcycled Mixtral written by
`foundry-upcycle import-hf` (the project's one Llama -> Mixtral upcycler), so both compute the same function.
A top-k other than the directory's own is served from a sibling directory whose config.json says so (weights
linked, not copied): every engine reads top-k from the config (`num_experts_per_tok` for Mixtral,
`ffn_config.moe_top_k` for DBRX), so the setting reaches each engine the same way.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from foundry_upcycle.shapes import ModelShape, hf_param_count

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedModel:
    name: str           # dense | moe-top<k>
    kind: str           # dense | moe
    top_k: Optional[int]
    path: str           # the directory the engine loads
    source: str         # what the user gave (a directory, or synthetic:<shape>)


def _transformers():
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
    import transformers
    return transformers


def read_config(path: str) -> dict[str, Any]:
    return json.loads((Path(path) / 'config.json').read_text())


def num_experts_of(config: dict[str, Any]) -> Optional[int]:
    if config.get('num_local_experts'):
        return int(config['num_local_experts'])
    e = (config.get('ffn_config') or {}).get('moe_num_experts')
    return int(e) if e else None


def with_top_k(path: str, top_k: int, work: Path) -> str:
    """`path` itself if it already routes to top_k experts, else a sibling dir with top_k in its config.json."""
    cfg = read_config(path)
    experts = num_experts_of(cfg)
    if experts is None:
        raise ValueError(f'moe_path: {path} holds a {cfg.get("architectures")}, not a mixture of experts')
    if not 1 <= top_k <= experts:
        raise ValueError(f'top_k={top_k} must be in [1, {experts}] for {path}')
    if cfg.get('model_type') == 'dbrx':
        current, cfg['ffn_config'] = cfg['ffn_config']['moe_top_k'], {**cfg['ffn_config'], 'moe_top_k': top_k}
    else:
        current, cfg['num_experts_per_tok'] = cfg.get('num_experts_per_tok'), top_k
    if current == top_k:
        return path
    out = work / f'{Path(path).name}-top{top_k}'
    out.mkdir(parents=True, exist_ok=True)
    for f in Path(path).iterdir():
        if f.name != 'config.json' and not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    (out / 'config.json').write_text(json.dumps(cfg, indent=2) + '\n')
    return str(out)


def synthetic_dirs(shape: ModelShape, max_len: int, seed: int, router_init_std: float, dtype: str,
                   work: Path) -> tuple[str, str]:
    """(dense dir, MoE dir): a random Llama (HF init, std 0.02) and its import-hf upcycle."""
    import torch
    from foundry_upcycle.export.hf_import import import_hf_to_mixtral
    tf = _transformers()
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=shape.vocab_size, hidden_size=shape.d_model, intermediate_size=shape.ffn_hidden,
                         num_hidden_layers=shape.n_layers, num_attention_heads=shape.n_heads,
                         num_key_value_heads=shape.n_kv_heads, max_position_embeddings=max_len, rms_norm_eps=1e-5,
                         rope_theta=10000.0, tie_word_embeddings=False, hidden_act='silu', pad_token_id=0,
                         bos_token_id=1, eos_token_id=2, torch_dtype=dtype)
    dense = work / 'dense'
    tf.LlamaForCausalLM(cfg).to(getattr(torch, dtype)).save_pretrained(str(dense), safe_serialization=True)
    moe = import_hf_to_mixtral(dense, work / 'moe', num_experts=shape.num_experts, top_k=2,
                               router_init_std=router_init_std, seed=seed, progress=False).path
    return str(dense), str(moe)


def served_models(dense_path: Optional[str], moe_path: Optional[str], top_ks: tuple[int, ...], source: dict[str, str],
                  work: Path) -> list[ServedModel]:
    out = []
    if dense_path:
        if num_experts_of(read_config(dense_path)) is not None:
            raise ValueError(f'dense_path: {dense_path} is a mixture of experts')
        out.append(ServedModel('dense', 'dense', None, dense_path, source['dense']))
    if moe_path:
        out += [ServedModel(f'moe-top{k}', 'moe', k, with_top_k(moe_path, k, work), source['moe']) for k in top_ks]
    return out


def model_info(m: ServedModel) -> dict[str, Any]:
    cfg = read_config(m.path)
    count = hf_param_count(cfg, m.top_k)
    return {
        'name': m.name, 'kind': m.kind, 'top_k': m.top_k, 'num_experts': num_experts_of(cfg), 'source': m.source,
        'architecture': (cfg.get('architectures') or ['?'])[0], 'total_params': count.total,
        'active_params': count.active,
        # forward FLOPs per token, matmuls only (no attention over the context): 2 x active non-embedding params
        'forward_flops_per_token': 2 * (count.active - count.embedding),
    }


def load_hf(path: str, dtype, device):
    """The model in `path` (transformers), on `device` in eval mode."""
    tf = _transformers()
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f'{path}: cannot load as a Hugging Face causal LM ({e})') from None
    if getattr(model.config, 'output_router_logits', False):
        log.warning('%s: config.json has output_router_logits true (an old import?); serving with it off, '
                    'since transformers would compute the aux loss on every decode step', path)
        model.config.output_router_logits = False
    return model.to(device).eval()
