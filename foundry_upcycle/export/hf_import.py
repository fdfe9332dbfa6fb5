"""Upcycle a dense Hugging Face Llama / Mistral checkpoint (safetensors) straight into a Mixtral checkpoint.

The result serves (config.json has `output_router_logits: false`: with it on, transformers 4.51's Mixtral
computes the aux loss on every decode step and `generate` fails under a KV cache) and trains with foundry's
`hf_causal_lm` through yamls/hf/mixtral.yaml, whose `config_overrides: {output_router_logits: true}` turns the
load-balancing loss (weight `router_aux_loss_coef`, stored here) on. Before any training it computes the dense
model's function: every expert is a copy of the dense MLP and Mixtral renormalises the top-k weights to sum to 1.

Streaming: the output plan (names, shapes, dtypes) comes from the safetensors headers; then each source tensor
is read on its own (`safetensors.safe_open`), expanded and appended to the current output shard, so memory is
bounded by the largest single job (the embedding / LM head, or E copies of one MLP matrix), whatever the depth
(benchmarks/import_scale.py: 2.4 GB peak RSS at Llama-3-8B width for 2 and 4 layers alike). The directory is built
beside the target and renamed into place only when complete (see `foundry_upcycle.atomic.atomic_output_dir`).

Shapes: D hidden_size, F intermediate_size, E experts.
  dense  model.layers.{i}.mlp.gate_proj / up_proj [F, D], down_proj [D, F]
  MoE    model.layers.{i}.block_sparse_moe.gate [E, D], experts.{e}.w1 = gate, w3 = up [F, D], w2 = down [D, F]
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from foundry_upcycle.config import UpcycleConfig
from foundry_upcycle.atomic import atomic_output_dir
from foundry_upcycle.export.sources import SafetensorsSource
from foundry_upcycle.export.targets import (ENGINES_FILE, engines_record, refuse_or_warn, vllm_rope_difference,
                                            vllm_versions)
from foundry_upcycle.export.writer import INDEX_NAME, SINGLE_NAME, Job, TensorSpec, copy_tokenizer_files, write_sharded
from foundry_upcycle.upcycle import MIXTRAL_EXPERT_NAMES, expert_copies, router_weight

log = logging.getLogger(__name__)

SOURCE_TYPES = ('llama', 'mistral')
_LAYER = re.compile(r'^model\.layers\.(\d+)\.(.+)$')
_PASS_LAYER = ('input_layernorm.weight', 'self_attn.q_proj.weight', 'self_attn.k_proj.weight',
               'self_attn.v_proj.weight', 'self_attn.o_proj.weight', 'post_attention_layernorm.weight')
_MLP_TO_EXPERT = {f'mlp.{dense}.weight': w for dense, w in MIXTRAL_EXPERT_NAMES.items()}
_IGNORED = re.compile(r'\.rotary_emb\.inv_freq$')  # written by old transformers versions; recomputed on load


@dataclass(frozen=True)
class ImportResult:
    path: Path
    tensors: int
    bytes_written: int
    bytes_read: int
    shards: int


class _Source:
    """A dense HF checkpoint directory: its config and its safetensors tensors."""

    def __init__(self, src: str | os.PathLike):
        self.dir = Path(src).expanduser()
        if not (self.dir / 'config.json').is_file():
            raise ValueError(f'src: {src} has no config.json; expected a Hugging Face model directory')
        self.tensors = SafetensorsSource(self._weight_files(), 'src')
        self.specs = self.tensors.specs
        self.read = self.tensors.read

    def _weight_files(self) -> dict[str, Path] | Path:
        index = self.dir / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())['weight_map']
            except (ValueError, KeyError) as e:
                raise ValueError(f'src: {index} is not a safetensors index ({e})') from None
            return {name: self.dir / file for name, file in weight_map.items()}
        single = self.dir / SINGLE_NAME
        if single.is_file():
            return single
        raise ValueError(f'src: {self.dir} has neither {SINGLE_NAME} nor {INDEX_NAME}; only safetensors checkpoints '
                         'are read (pickled .bin files are not)')

    def config(self):
        from transformers import AutoConfig
        raw = json.loads((self.dir / 'config.json').read_text())
        if raw.get('model_type') not in SOURCE_TYPES:
            raise ValueError(f'src: config.json model_type is {raw.get("model_type")!r}; supported: {SOURCE_TYPES}')
        return AutoConfig.from_pretrained(str(self.dir))


def _check_source_config(cfg) -> None:
    for key in ('attention_bias', 'mlp_bias'):
        if getattr(cfg, key, False):
            raise ValueError(f'src: config.json {key}=true; Mixtral holds no biases')


def vllm_differences(dense, versions=None) -> dict[str, str]:
    """{config.json key: why} where vLLM's Mixtral (`versions`, default targets.vllm_versions()) would compute the
    import differently from transformers: the export's rules (targets.py)."""
    out = {}
    why = vllm_rope_difference('mixtral', getattr(dense, 'rope_scaling', None), versions or vllm_versions())
    if why:
        out['rope_scaling'] = why
    if getattr(dense, 'hidden_act', 'silu') != 'silu':
        out['hidden_act'] = f"{dense.hidden_act!r}: vLLM's Mixtral always applies SiLU in its experts"
    return out


def mixtral_config(dense, up: UpcycleConfig, dtype: torch.dtype):
    """MixtralConfig with the dense model's shapes and `up.num_experts` copies, set up for serving (no router
    logits); the load-balancing weight is stored for training, which turns the router logits on."""
    from transformers import MixtralConfig
    extra = {}
    if getattr(dense, 'rope_scaling', None) is not None:
        extra['rope_scaling'] = dense.rope_scaling  # transformers' Mixtral reads it like Llama's
    return MixtralConfig(
        vocab_size=dense.vocab_size, hidden_size=dense.hidden_size, intermediate_size=dense.intermediate_size,
        num_hidden_layers=dense.num_hidden_layers, num_attention_heads=dense.num_attention_heads,
        num_key_value_heads=dense.num_key_value_heads,
        head_dim=getattr(dense, 'head_dim', None) or dense.hidden_size // dense.num_attention_heads,
        hidden_act=dense.hidden_act, max_position_embeddings=dense.max_position_embeddings,
        rms_norm_eps=dense.rms_norm_eps, rope_theta=dense.rope_theta,
        sliding_window=getattr(dense, 'sliding_window', None),
        attention_dropout=getattr(dense, 'attention_dropout', 0.0), tie_word_embeddings=dense.tie_word_embeddings,
        bos_token_id=dense.bos_token_id, eos_token_id=dense.eos_token_id, pad_token_id=dense.pad_token_id,
        num_local_experts=up.num_experts, num_experts_per_tok=up.top_k, output_router_logits=False,
        router_aux_loss_coef=up.load_balancing_loss_weight, router_jitter_noise=0.0, torch_dtype=dtype,
        architectures=['MixtralForCausalLM'], **extra,
    )


def _expected_dense(cfg) -> dict[str, tuple[int, ...]]:
    D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    hd = getattr(cfg, 'head_dim', None) or D // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    layer = {'input_layernorm.weight': (D,), 'post_attention_layernorm.weight': (D,),
             'self_attn.q_proj.weight': (q, D), 'self_attn.k_proj.weight': (kv, D), 'self_attn.v_proj.weight': (kv, D),
             'self_attn.o_proj.weight': (D, q), 'mlp.gate_proj.weight': (F, D), 'mlp.up_proj.weight': (F, D),
             'mlp.down_proj.weight': (D, F)}
    out = {'model.embed_tokens.weight': (V, D), 'model.norm.weight': (D,)}
    if not cfg.tie_word_embeddings:
        out['lm_head.weight'] = (V, D)
    for i in range(cfg.num_hidden_layers):
        out.update({f'model.layers.{i}.{k}': s for k, s in layer.items()})
    return out


def _check_tensors(specs: dict[str, TensorSpec], cfg) -> dict[str, TensorSpec]:
    ignored = sorted(k for k in specs if _IGNORED.search(k))
    if ignored:
        log.info('skipping %d rotary inv_freq buffers (recomputed on load)', len(ignored))
    specs = {k: v for k, v in specs.items() if k not in ignored}
    if cfg.tie_word_embeddings and 'lm_head.weight' in specs:
        specs.pop('lm_head.weight')  # a tied head saved anyway: the embedding is its single source
    expected = _expected_dense(cfg)
    extra, missing = sorted(set(specs) - set(expected)), sorted(set(expected) - set(specs))
    if extra or missing:
        raise ValueError(f'src: tensors do not match a dense {cfg.model_type} with this config.json: '
                         f'unexpected {extra[:5]}, missing {missing[:5]}')
    for name, shape in expected.items():
        if specs[name].shape != shape:
            raise ValueError(f'src: {name} has shape {specs[name].shape}, config.json gives {shape}')
    return specs


def _jobs(source: _Source, specs: dict[str, TensorSpec], cfg, up: UpcycleConfig) -> list[Job]:
    """Output jobs in model order: embedding, then per layer attention, router and experts, then norm and head."""
    E, D, L = up.num_experts, cfg.hidden_size, cfg.num_hidden_layers
    dtype = specs['model.embed_tokens.weight'].dtype
    generator = torch.Generator().manual_seed(up.seed)
    # Routers in layer order from one seeded generator, as `upcycle.upcycle_state_dict` draws them.
    routers = [router_weight(E, D, up.router_init_std, generator, dtype) for _ in range(L)]

    def passthrough(name: str, out_name: Optional[str] = None) -> Job:
        s = specs[name]
        return Job((TensorSpec(out_name or name, s.shape, s.dtype),), lambda: [source.read(name)])

    def experts(i: int, rest: str) -> Job:
        name, w = f'model.layers.{i}.{rest}', _MLP_TO_EXPERT[rest]
        s = specs[name]
        out = tuple(TensorSpec(f'model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight', s.shape, s.dtype)
                    for e in range(E))
        # [rows, cols] -> [E*rows, cols] -> E x [rows, cols]
        return Job(out, lambda: list(expert_copies(source.read(name), E).chunk(E)))

    jobs = [passthrough('model.embed_tokens.weight')]
    for i in range(L):
        jobs += [passthrough(f'model.layers.{i}.{rest}') for rest in _PASS_LAYER]
        gate = TensorSpec(f'model.layers.{i}.block_sparse_moe.gate.weight', (E, D), dtype)
        jobs.append(Job((gate,), lambda i=i: [routers[i]]))
        jobs += [experts(i, rest) for rest in _MLP_TO_EXPERT]
    jobs.append(passthrough('model.norm.weight'))
    if 'lm_head.weight' in specs:
        jobs.append(passthrough('lm_head.weight'))
    return jobs


def import_hf_to_mixtral(src: str | os.PathLike, out: str | os.PathLike, num_experts: int = 8, top_k: int = 2,
                         router_init_std: float = 0.02, seed: int = 0, load_balancing_loss_weight: float = 0.01,
                         shard_size_mb: float = 2048, overwrite: bool = False, progress: bool = True,
                         allow_inexact_engines: bool = False) -> ImportResult:
    """Dense HF Llama/Mistral safetensors dir `src` -> Mixtral dir `out` (written atomically, streamed). A source
    that vLLM's Mixtral would compute differently is refused like the export does, unless `allow_inexact_engines`."""
    up = UpcycleConfig(num_experts=num_experts, top_k=top_k, router_init_std=float(router_init_std), seed=seed,
                       load_balancing_loss_weight=float(load_balancing_loss_weight))
    if not shard_size_mb > 0:
        raise ValueError(f'shard_size_mb must be > 0, got {shard_size_mb!r}')
    source = _Source(src)
    dense = source.config()
    _check_source_config(dense)
    specs = _check_tensors(source.specs, dense)
    jobs = _jobs(source, specs, dense, up)
    dtype = specs['model.embed_tokens.weight'].dtype
    versions = vllm_versions()
    diffs = vllm_differences(dense, versions)
    refuse_or_warn('mixtral import', {f'src config.json {k}': v for k, v in diffs.items()}, allow_inexact_engines, log)
    with atomic_output_dir(out, tag='hf-import', overwrite=overwrite) as tmp:
        paths = write_sharded(tmp, jobs, int(shard_size_mb * 2**20), desc='upcycling to mixtral', progress=progress)
        mixtral_config(dense, up, dtype).save_pretrained(str(tmp))
        (tmp / ENGINES_FILE).write_text(json.dumps(engines_record('mixtral', diffs, versions), indent=1) + '\n')
        copy_tokenizer_files(source.dir, tmp, extra=('generation_config.json',))
    log.info('wrote Mixtral (%d experts, top-%d) to %s', num_experts, top_k, out)
    return ImportResult(path=Path(out), tensors=sum(len(j.specs) for j in jobs),
                        bytes_written=sum(j.nbytes for j in jobs), bytes_read=sum(s.nbytes for s in specs.values()),
                        shards=len(paths))
