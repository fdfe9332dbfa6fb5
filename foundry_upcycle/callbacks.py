"""Registered callback `upcycle_loader`: tiles the dense checkpoint into the MoE model at BEFORE_LOAD.

Runs inside Composer's Trainer after FSDP wrapping and before autoresume:
- With an autoresume checkpoint of the run itself in `save_folder` (found the way Composer looks for it), it does
  nothing: Composer loads that checkpoint next, and reading the dense one would only cost memory.
- Otherwise rank 0 alone opens the dense checkpoint (`reader.open_source`: weights only, memory-mapped or read
  tensor by tensor) and plans the upcycled tensors with the model's mapping: `upcycle.mpt_moe_jobs` for
  `mpt_upcycle_causal_lm` (MegaBlocks layout), `llama_to_mixtral.hf_upcycle_jobs` for `hf_upcycle_causal_lm`
  (a dense Llama / Mistral directory into a transformers Mixtral, or a Mixtral grown). `sharded_load.load_jobs` then streams them: rank 0
  produces one tensor at a time and every rank receives it straight into its (sharded) parameter. Nothing
  E-times larger than one dense tensor is held (MegaBlocks' [E*F, D] expert tensors are the largest), nothing is
  written to disk. Names and shapes are recorded at INIT, before wrapping, so no rank gathers the model to read them.
- Under `init_device: mixed` (FSDP wrap delayed until after loading) rank 0 loads into its unwrapped model and
  Composer's wrap broadcasts it (`sync_module_states`); the callback never wraps, so an autoresume load cannot wrap twice.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from foundry_upcycle import reader
from foundry_upcycle.jobs import Job
from foundry_upcycle.sharded_load import from_rank0, full_param, load_jobs, model_keys
from foundry_upcycle.upcycle import check_shapes
from foundry_upcycle.weights import UpcycleWeights, copy_spread

log = logging.getLogger(__name__)

SOURCE_KEYS = 'upcycle.from (or the recipe\'s load_path)'
# model layout -> (a key every such model has, relative to its prefix)
_ANCHORS = {'mpt': 'transformer.wte.weight', 'mixtral': 'model.embed_tokens.weight'}


class UpcycleLoader(Callback):
    """source: the dense checkpoint (MPT: Composer .pt / torch / safetensors file; HF: a model directory).
    weights: `weights.UpcycleWeights` fields (num_experts, router_init_std, seed, expert_noise_std, ...)."""

    def __init__(self, source: str, autoresume: bool = False, **weights: Any):
        self.source = source
        self.opts = UpcycleWeights.from_mapping(weights, 'callbacks.upcycle_loader')
        self.autoresume = autoresume
        self.fresh_after_load: bool | None = None  # set at AFTER_LOAD: True = fresh copies, False = resumed/trained
        self.report: dict = {}  # what BEFORE_LOAD did, for logs and tests
        self._expected: Optional[dict[str, tuple[int, ...]]] = None
        self._layout: Optional[str] = None

    @property
    def num_experts(self) -> int:
        return self.opts.num_experts

    def init(self, state: State, logger: Logger) -> None:
        # Before any wrapping: the model's state-dict names and shapes (meta tensors are fine), read without gathering.
        self._expected = model_keys(state.model)
        if any(k.endswith('ffn.experts.mlp.w1') for k in self._expected):
            self._layout = 'mpt'
        elif any('.block_sparse_moe.' in k for k in self._expected):
            self._layout = 'mixtral'
        else:
            raise ValueError('callbacks.upcycle_loader: the model has no MoE layer to upcycle into '
                             '(expected mpt_upcycle_causal_lm or hf_upcycle_causal_lm)')

    def before_load(self, state: State, logger: Logger) -> None:
        assert self._expected is not None, 'Event.INIT did not reach the upcycle_loader callback'
        resume = self._autoresume_checkpoint(state)
        if resume is not None:
            self.report = {'action': 'skipped', 'autoresume_checkpoint': resume}
            log.info('upcycle: autoresume checkpoint %s found; skipping the dense load (Composer loads the run\'s own '
                     'checkpoint next)', resume)
            return
        delayed_wrap = state.load_monolith_rank0_only and not state.fsdp_enabled  # init_device: mixed
        with contextlib.ExitStack() as stack:  # keeps a downloaded copy until the load is done
            jobs, error = None, None
            if dist.get_global_rank() == 0:
                try:
                    jobs = self._plan(stack)
                except ValueError as e:
                    error = str(e)
            error = from_rank0(error)
            if error is not None:
                raise ValueError(error)
            loaded = load_jobs(state.model, jobs, self._expected, broadcast=not delayed_wrap)
        if not delayed_wrap or dist.get_global_rank() == 0:
            assert loaded == set(self._expected), sorted(set(self._expected) ^ loaded)[:5]
        self.report = {'action': 'upcycled', 'delayed_wrap': delayed_wrap, 'layout': self._layout}
        log.info('upcycle: loaded %s into %d experts per block', self.source, self.opts.experts)

    def after_load(self, state: State, logger: Logger) -> None:
        spread = self._expert_spread(state.model)
        if self.opts.copies_only or self.report.get('action') == 'skipped':
            self.fresh_after_load = spread == 0.0
            what = 'identical copies of their source' if self.fresh_after_load else 'distinct (trained weights)'
        else:  # drop_ratio / noise: the experts differ from the first step on, by design
            self.fresh_after_load = None
            what = 'distinct by design (drop_ratio / expert_noise_std)'
        self.report['fresh_after_load'] = self.fresh_after_load
        log.info('upcycle: after load at batch %d, experts are %s (max spread between copies %.3g)',
                 int(state.timestamp.batch), what, spread)
        logger.log_hyperparameters({'upcycle/fresh_experts_after_load': self.fresh_after_load})

    def _expert_spread(self, model) -> float:
        """Max difference between experts that start as copies of one matrix, in the first MoE block."""
        if self._layout == 'mpt':
            with full_param(model, 'ffn.experts.mlp.w1') as w1:
                return copy_spread(w1, self.opts)
        first_layer = min(int(k.split('.layers.')[1].split('.')[0]) for k in self._expected if '.block_sparse_moe.' in k)
        w1 = []
        for e in range(self.opts.experts):
            with full_param(model, f'.layers.{first_layer}.block_sparse_moe.experts.{e}.w1.weight') as w:
                w1.append(w.detach().clone())
        return copy_spread(torch.cat(w1), self.opts)

    def _plan(self, stack: contextlib.ExitStack) -> list[Job]:
        """Rank 0: the upcycled tensors as jobs over the dense source, checked against the model (no data read
        yet). ValueErrors name the key and the file."""
        assert self._expected is not None
        path = self._local_path(stack)
        anchor = _ANCHORS[self._layout]
        key = next((k for k in self._expected if k.endswith(anchor)), None)
        assert key is not None, f'no {anchor} in the model'
        prefix = key[:-len(anchor)]
        source = reader.open_source(path, SOURCE_KEYS)
        where = f'{SOURCE_KEYS} {self.source}'
        try:
            if self._layout == 'mpt':
                from foundry_upcycle.upcycle import mpt_moe_jobs
                jobs = mpt_moe_jobs(source, self.opts, out_prefix=prefix)
            else:
                from foundry_upcycle.llama_to_mixtral import hf_upcycle_jobs
                jobs, _ = hf_upcycle_jobs(path, source, self.opts, out_prefix=prefix, what=where)
        except ValueError as e:
            raise ValueError(e if str(e).startswith(where) else f'{where}: {e}') from None
        check_shapes({s.name: s.shape for job in jobs for s in job.specs}, self._expected, where)
        return jobs

    def _local_path(self, stack: contextlib.ExitStack) -> str:
        if '://' not in self.source:
            return self.source
        from composer.utils import get_file
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        local = str(Path(tmp) / Path(self.source).name)
        get_file(self.source, local)
        return local

    def _autoresume_checkpoint(self, state: State) -> Optional[str]:
        """The checkpoint Composer's autoresume will load next, as rank 0 sees it (same rule as the Trainer: the
        save folder's `latest` file of rank 0). Remote-only checkpoints are not looked up: then the dense load runs
        and the autoresume load still wins."""
        if not self.autoresume:
            return None
        from composer.callbacks import CheckpointSaver
        from composer.utils import format_name_with_dist
        saver = next((c for c in state.callbacks if isinstance(c, CheckpointSaver)), None)
        path = None
        if dist.get_global_rank() == 0 and saver is not None and saver.latest_filename is not None:
            folder = format_name_with_dist(saver.folder, state.run_name)
            latest = os.path.join(folder, format_name_with_dist(saver.latest_filename.filename, state.run_name))
            path = os.path.abspath(latest) if os.path.exists(latest) else None
        return from_rank0(path)
