"""Upcycle a dense Hugging Face Llama / Mistral checkpoint (safetensors) straight into a Mixtral checkpoint.

The result serves (config.json has `output_router_logits: false`: with it on, transformers 4.51's Mixtral
computes the aux loss on every decode step and `generate` fails under a KV cache) and trains with foundry's
`hf_causal_lm` through yamls/hf/mixtral.yaml, whose `config_overrides: {output_router_logits: true}` turns the
load-balancing loss (weight `router_aux_loss_coef`, stored here) on. Before any training it computes the dense
model's function: every expert is a copy of the dense MLP and Mixtral renormalises the top-k weights to sum to 1.

The mapping is `llama_to_mixtral.mixtral_jobs`, shared with the `hf_upcycle_causal_lm` model's in-training loader.
Streaming: the output plan (names, shapes, dtypes) comes from the safetensors headers; then each source tensor
is read on its own (`reader.SafetensorsSource`), and its copies appended one at a time to the current output shard,
so memory is bounded by the largest single job (the embedding / LM head, or one MLP matrix and a copy), whatever the depth
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from foundry_upcycle.atomic import atomic_output_dir
from foundry_upcycle.config import UpcycleConfig
from foundry_upcycle.export.targets import (ENGINES_FILE, engines_record, refuse_or_warn, vllm_rope_difference,
                                            vllm_versions)
from foundry_upcycle.export.writer import copy_tokenizer_files, write_sharded
from foundry_upcycle.llama_to_mixtral import (SOURCE_TYPES, check_tensors, hf_upcycle_jobs,  # noqa: F401
                                              mixtral_config, mixtral_jobs, read_dense_config, torch_dtype,
                                              upcycled_mixtral_config)
from foundry_upcycle.reader import SafetensorsSource, hf_weight_files

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImportResult:
    path: Path
    tensors: int
    bytes_written: int
    bytes_read: int
    shards: int


def import_hf_to_mixtral(src: str | os.PathLike, out: str | os.PathLike, num_experts: int = 8, top_k: int = 2,
                         router_init_std: float = 0.02, seed: int = 0, load_balancing_loss_weight: float = 0.01,
                         shard_size_mb: float = 2048, overwrite: bool = False, progress: bool = True,
                         allow_inexact_engines: bool = False, granularity: int = 1, drop_ratio: float = 0.0,
                         grow: int = 1) -> ImportResult:
    """Dense HF Llama/Mistral safetensors dir `src` -> Mixtral dir `out` (written atomically, streamed); with
    grow > 1, a Mixtral `src` grown m-fold (num_experts / top_k / granularity then describe `src`). A source that
    vLLM's Mixtral would compute differently is refused like the export does, unless `allow_inexact_engines`."""
    up = UpcycleConfig(num_experts=num_experts, top_k=top_k, router_init_std=float(router_init_std), seed=seed,
                       load_balancing_loss_weight=float(load_balancing_loss_weight), granularity=granularity,
                       drop_ratio=float(drop_ratio), grow=grow)
    if not shard_size_mb > 0:
        raise ValueError(f'shard_size_mb must be > 0, got {shard_size_mb!r}')
    src_dir = Path(src).expanduser()
    source = SafetensorsSource(hf_weight_files(src_dir, 'src'), 'src')
    jobs, dense = hf_upcycle_jobs(src_dir, source, up.weights(), what='src')
    dtype = torch_dtype(source.specs)
    versions = vllm_versions()
    diffs = vllm_differences(dense, versions)
    refuse_or_warn('mixtral import', {f'src config.json {k}': v for k, v in diffs.items()}, allow_inexact_engines, log)
    with atomic_output_dir(out, tag='hf-import', overwrite=overwrite) as tmp:
        paths = write_sharded(tmp, jobs, int(shard_size_mb * 2**20), desc='upcycling to mixtral', progress=progress)
        upcycled_mixtral_config(dense, up.num_experts, up.top_k, up.granularity, up.grow, up.load_balancing_loss_weight,
                                dtype).save_pretrained(str(tmp))
        (tmp / ENGINES_FILE).write_text(json.dumps(engines_record('mixtral', diffs, versions), indent=1) + '\n')
        copy_tokenizer_files(src_dir, tmp, extra=('generation_config.json',))
    log.info('wrote Mixtral (%d experts, top-%d) to %s', up.total_experts, up.total_top_k, out)
    return ImportResult(path=Path(out), tensors=sum(len(j.specs) for j in jobs),
                        bytes_written=sum(j.nbytes for j in jobs), bytes_read=_bytes_read(source, dense),
                        shards=len(paths))


def vllm_differences(dense: Mapping[str, Any], versions=None) -> dict[str, str]:
    """{config.json key: why} where vLLM's Mixtral (`versions`, default targets.vllm_versions()) would compute the
    import differently from transformers: the export's rules (targets.py)."""
    out = {}
    why = vllm_rope_difference('mixtral', dense.get('rope_scaling'), versions or vllm_versions())
    if why:
        out['rope_scaling'] = why
    if dense.get('hidden_act', 'silu') != 'silu':
        out['hidden_act'] = f"{dense['hidden_act']!r}: vLLM's Mixtral always applies SiLU in its experts"
    return out


def _bytes_read(source: SafetensorsSource, cfg) -> int:
    if cfg.get('model_type') == 'mixtral':
        return sum(s.nbytes for s in source.specs.values())
    return sum(s.nbytes for s in check_tensors(source.specs, cfg).values())
