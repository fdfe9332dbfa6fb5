"""Offline upcycling: dense checkpoint in, MoE checkpoint out, for users who prefer `load_path:` (every variant of the
block: granularity, drop_ratio, moe_layers, and grow from an MoE checkpoint).

The same mapping as the `upcycle_loader` callback (`upcycle.mpt_moe_jobs`) over the same reader. A `.safetensors`
output is streamed (one tensor in memory at a time); a Composer `.pt` output is one `torch.save` of the whole
state dict, so it holds the upcycled model in memory.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Mapping, Optional

from foundry_upcycle.checkpoint_io import save_composer_weights
from foundry_upcycle.config import UpcycleConfig, dense_ffn_shape
from foundry_upcycle.jobs import Job, run_jobs
from foundry_upcycle.reader import open_source
from foundry_upcycle.upcycle import mpt_moe_jobs, split_ffn_keys

log = logging.getLogger(__name__)


def convert(source: str, out: str, ucfg: UpcycleConfig, model_cfg: Optional[Mapping[str, Any]] = None,
            overwrite: bool = False) -> Path:
    """Writes the upcycled checkpoint to `out` (.safetensors, else a weights-only Composer .pt) atomically."""
    dest = Path(out)
    if dest.exists() and not overwrite:
        raise ValueError(f'--out {out} already exists; pass --overwrite to replace it')
    jobs = mpt_moe_jobs(open_source(source, 'dense checkpoint'), ucfg.weights())
    if model_cfg is not None:
        check_against_model_config(jobs, model_cfg, ucfg, source)
    meta = {'foundry_upcycle': {'source': str(source), **ucfg.to_mapping()}}
    if dest.suffix == '.safetensors':
        from foundry_upcycle.atomic import atomic_write
        from foundry_upcycle.export.writer import write_safetensors_stream
        atomic_write(dest, lambda tmp: write_safetensors_stream(Path(tmp), jobs,
                                                                {'foundry_upcycle': repr(meta['foundry_upcycle'])}))
    else:
        save_composer_weights(run_jobs(jobs), str(dest), meta)
    log.info('wrote %s (%d tensors)', dest, sum(len(j.specs) for j in jobs))
    return dest


def check_against_model_config(jobs: list[Job], model_cfg: Mapping[str, Any], ucfg: UpcycleConfig,
                               source: str) -> None:
    """Cheap shape check against a recipe's dense `model:` block, without building the model or reading weights."""
    _, hidden = dense_ffn_shape(model_cfg)
    d_model, n_layers = model_cfg.get('d_model'), model_cfg.get('n_layers')
    shapes = {s.name: s.shape for job in jobs for s in job.specs}
    prefix, blocks = split_ffn_keys(shapes)
    if n_layers is not None and len(blocks) != n_layers:
        raise ValueError(f'{source}: {len(blocks)} blocks, but model.n_layers is {n_layers}')
    first = min(i for i, names in blocks.items() if 'experts.mlp.w1' in names)
    w1 = shapes[blocks[first]['experts.mlp.w1']]
    want = (ucfg.num_experts * ucfg.grow * hidden, d_model)    # E*G experts of F/G rows (x m grown)
    if tuple(w1) != want:
        raise ValueError(f'{source}: {prefix}{first}.ffn.experts.mlp.w1 is {tuple(w1)} but the recipe expects {want} '
                         '(check model.d_model and ffn_hidden_size / expansion_ratio)')


def offline_recipe(expanded: dict[str, Any], moe_checkpoint: str) -> dict[str, Any]:
    """An expanded upcycling recipe that loads a converted checkpoint through `load_path` instead of the callback."""
    cfg = copy.deepcopy(expanded)
    callbacks = cfg.get('callbacks') or {}
    callbacks.pop('upcycle_loader', None)
    cfg['callbacks'] = callbacks
    cfg['load_path'] = moe_checkpoint
    cfg['load_weights_only'] = True
    return cfg
