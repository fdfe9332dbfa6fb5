"""Evaluation of one arm with foundry's own machinery: held-out cross-entropy and the ICL gauntlet.

The steps are those of `llmfoundry.command_utils.eval.evaluate_model`, in-process so `llmfoundry` is imported once:
foundry's `StreamingTextDataset` on each held-out MDS split, its loss per token attributed to the held-out
documents (`study/heldout.py`: the same number as foundry's `LanguageCrossEntropy`, plus the per-document sums the
study's noise estimate resamples), `build_icl_evaluators` on the gauntlet tasks (`gauntlet.prepare_gauntlet`),
Composer's `Trainer.eval`, and foundry's `EvalGauntlet` callback for its core average. Deliberate differences from
`llmfoundry eval`:
- weights are read with `torch.load(weights_only=True)` (`checkpoint_io.load_state_dict`) and loaded strictly,
  instead of Composer's `load_path`, which unpickles the whole checkpoint;
- the tokenizer, data loaders and ICL datasets are built once per `EvalSession` and reused for every model.

Importing this module is cheap and sets the Hugging Face offline variables; llmfoundry is imported on first use.
"""
from __future__ import annotations

import copy
import gc
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from foundry_upcycle.study.gauntlet import GauntletSpec, PreparedGauntlet, gauntlet_scores, prepare_gauntlet
from foundry_upcycle.study.heldout import heldout_losses, open_split

log = logging.getLogger(__name__)

OFFLINE_ENV = {'HF_HUB_OFFLINE': '1', 'TRANSFORMERS_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1'}
GAUNTLET_PREFIX = 'icl/metrics/eval_gauntlet/'
_MB_TO_TORCH_DMOE_KEYS = ('ffn_hidden_size', 'ffn_act_fn', 'moe_num_experts', 'moe_top_k', 'mlp_type',
                          'moe_jitter_eps', 'moe_normalize_expert_weights', 'uniform_expert_assignment', 'fc_type')


def set_offline_env() -> None:
    """Nothing is fetched from a hub: huggingface_hub and datasets read these when first imported."""
    os.environ.update(OFFLINE_ENV)
    os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')


set_offline_env()


def _torch_dmoe_from_megablocks(ffn: Mapping[str, Any]) -> dict[str, Any]:
    """An `mb_dmoe` ffn_config as the `torch_dmoe` with the same weights and function (CPU eval)."""
    out = {k: copy.deepcopy(ffn[k]) for k in _MB_TO_TORCH_DMOE_KEYS if k in ffn}
    out['ffn_type'] = 'torch_dmoe'
    # megablocks' own defaults where the config leaves them out (its activation is tanh-GELU)
    out.setdefault('ffn_act_fn', {'name': 'gelu', 'approximate': 'tanh'})
    out.setdefault('moe_num_experts', 1)
    out.setdefault('moe_top_k', 1)
    out.setdefault('mlp_type', 'mlp')
    out.setdefault('moe_jitter_eps', None)
    out.setdefault('moe_normalize_expert_weights', None)
    out.setdefault('uniform_expert_assignment', False)
    return out


def eval_model_config(model_cfg: Mapping[str, Any], cuda: bool) -> tuple[str, dict[str, Any]]:
    """(registry name, kwargs) of the model to evaluate; without CUDA, the CPU settings (torch attention, ...)."""
    cfg = copy.deepcopy(dict(model_cfg))
    name = cfg.pop('name', None)
    if not name:
        raise ValueError('model: the config has no `name` (e.g. mpt_causal_lm)')
    cfg['init_device'] = 'cpu'
    if cuda or name in ('hf_causal_lm', 'hf_upcycle_causal_lm'):   # transformers picks its CPU attention itself
        return name, cfg
    attn = dict(cfg.get('attn_config') or {})
    if attn.get('attn_impl', 'flash') != 'torch':
        log.warning('eval on CPU: model.attn_config.attn_impl %r -> torch', attn.get('attn_impl', 'flash'))
        attn['attn_impl'] = 'torch'
        cfg['attn_config'] = attn
    cfg['loss_fn'] = 'torch_crossentropy'  # the fused loss needs CUDA; eval metrics do not use it
    ffn = dict(cfg.get('ffn_config') or {})
    if ffn.get('ffn_type') == 'mb_moe':
        raise ValueError('model.ffn_config.ffn_type mb_moe (dropping MoE) has no CPU implementation; evaluate it '
                         'on a GPU with megablocks installed')
    if ffn.get('ffn_type') == 'mb_dmoe':
        log.warning('eval on CPU: model.ffn_config.ffn_type mb_dmoe -> torch_dmoe (same weights, no megablocks)')
        cfg['ffn_config'] = _torch_dmoe_from_megablocks(ffn)
    return name, cfg


def _positive_int(value: Any, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f'{key}: must be a positive integer, got {value!r}')
    return value


def _mds_dir(name: str, path: Union[str, os.PathLike]) -> Path:
    p = Path(path)
    if not (p / 'index.json').is_file():
        raise ValueError(f'eval_data[{name!r}]: {path} is not an MDS split (no index.json in it)')
    return p


class EvalSession:
    """Builds the tokenizer, validation loaders and ICL datasets once; `evaluate` runs one checkpoint through them.

    eval_data: name -> held-out MDS split folder (holding index.json); results as `ce_<name>`, with the per-unit
      sums as `heldout[name]`. doc_tokens: name -> each document's span in that split's token stream (units:
      documents); a name without spans is read in sequence blocks.
    icl: the gauntlet tasks, or None for cross-entropy only.
    work_dir: scratch space (task subsets, foundry's processed ICL copies).
    num_threads: torch intra-op threads while evaluating (None: leave as is). On a 2-core machine shared with other
      work, 1 thread ran this eval 5-10x faster than 2 (busy-waiting threads); on an idle machine 2 should win.
    """

    def __init__(self, tokenizer_dir: Union[str, os.PathLike], eval_data: Mapping[str, Union[str, os.PathLike]],
                 icl: Optional[GauntletSpec], seq_len: int, batch_size: int, work_dir: Union[str, os.PathLike],
                 progress: bool = True, num_threads: Optional[int] = None,
                 doc_tokens: Optional[Mapping[str, Sequence[int]]] = None):
        if not Path(tokenizer_dir).is_dir():
            raise ValueError(f'tokenizer: {tokenizer_dir} is not a tokenizer directory')
        self.tokenizer_dir = str(tokenizer_dir)
        self.eval_data = {name: _mds_dir(name, path) for name, path in eval_data.items()}
        self.doc_tokens = {k: list(v) for k, v in (doc_tokens or {}).items()}
        if icl is not None and not isinstance(icl, GauntletSpec):
            raise ValueError(f'icl: expected a GauntletSpec or None, got {type(icl).__name__}')
        self.icl = icl
        self.seq_len = _positive_int(seq_len, 'seq_len')
        self.batch_size = _positive_int(batch_size, 'batch_size')
        self.work_dir = Path(work_dir)
        self.progress = progress
        self.num_threads = None if num_threads is None else _positive_int(num_threads, 'num_threads')
        self.prepared: Optional[PreparedGauntlet] = None
        self._evaluators: Optional[list] = None
        # wall-clock of the last `evaluate` (kept out of the results, which are deterministic)
        self.last_seconds: float = 0.0
        self.last_seconds_by_task: dict[str, float] = {}

    def _count_tokens(self, text: str) -> int:
        """An upper bound of foundry's token count for an answer (with or without a leading space / specials)."""
        return max(len(self.tokenizer(t, add_special_tokens=s, verbose=False)['input_ids']) for t in (text, ' ' + text)
                   for s in (False, True))

    def _build(self) -> None:
        from datasets.utils.logging import disable_progress_bar
        from llmfoundry.callbacks import EvalGauntlet
        from llmfoundry.utils.builders import build_icl_evaluators, build_tokenizer

        disable_progress_bar()  # one "Map" bar per ICL dataset otherwise
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.tokenizer = build_tokenizer(self.tokenizer_dir, {'model_max_length': self.seq_len})
        self.splits = {name: open_split(self.tokenizer, path, self.seq_len, self.batch_size)
                       for name, path in self.eval_data.items()}
        evaluators = []
        self.gauntlet = None
        if self.icl is not None:
            self.prepared = prepare_gauntlet(self.icl, self.work_dir / 'icl_data', self._count_tokens, self.seq_len)
            if self.prepared.icl_tasks:
                processed = self.work_dir / 'icl_processed'  # foundry copies each task file here
                processed.mkdir(parents=True, exist_ok=True)
                icl_evaluators, logger_keys = build_icl_evaluators(
                    copy.deepcopy(self.prepared.icl_tasks), self.tokenizer, self.seq_len, self.batch_size,
                    destination_dir=str(processed))
                gauntlet_cfg = copy.deepcopy(self.prepared.eval_gauntlet)
                gauntlet_cfg['logger_keys'] = logger_keys
                gauntlet_cfg['benchmark_sizes'] = {e.label: e.dataloader.num_samples for e in icl_evaluators}
                self.gauntlet = EvalGauntlet(**gauntlet_cfg)
                evaluators += icl_evaluators
        self._evaluators = evaluators

    def evaluate(self, checkpoint: Optional[Union[str, os.PathLike]], model_cfg: Mapping[str, Any]) -> dict[str, Any]:
        """The eval results of the weights in `checkpoint` under the (final, transformed) model config; checkpoint
        None: the weights the model block loads itself (`hf_causal_lm` of a real base, `pretrained: true`)."""
        import torch

        start = time.time()
        threads = torch.get_num_threads()
        if self.num_threads is not None:
            torch.set_num_threads(self.num_threads)
        try:
            out = self._evaluate(checkpoint, model_cfg)
        finally:
            torch.set_num_threads(threads)
        self.last_seconds = round(time.time() - start, 2)
        return out

    def _evaluate(self, checkpoint: Optional[Union[str, os.PathLike]], model_cfg: Mapping[str, Any]) -> dict[str, Any]:
        import torch
        from composer import Trainer
        from llmfoundry.utils.builders import add_metrics_to_eval_loaders, build_composer_model
        from tqdm.auto import tqdm

        name, cfg = eval_model_config(model_cfg, torch.cuda.is_available())
        if self._evaluators is None:
            self._build()
        model = build_composer_model(name=name, cfg=cfg, tokenizer=self.tokenizer)
        if checkpoint is not None:
            _load_weights(model, checkpoint)
        elif not cfg.get('pretrained'):
            raise ValueError(f'eval: no checkpoint and model {name} loads no weights (pretrained: false)')
        self.last_seconds_by_task = {}
        heldout = {}
        for label, dataset in self.splits.items():
            t0 = time.time()
            heldout[label] = heldout_losses(model, dataset, self.batch_size, self.doc_tokens.get(label))
            self.last_seconds_by_task[label] = round(time.time() - t0, 3)
        state = None
        if self._evaluators:
            evaluators = add_metrics_to_eval_loaders(self._evaluators, list(model.get_metrics(is_train=True)))
            with warnings.catch_warnings():
                _quiet_known_warnings()
                trainer = Trainer(model=model, precision='amp_bf16' if torch.cuda.is_available() else 'fp32',
                                  progress_bar=False, log_to_console=False, loggers=[], seed=0)
            try:
                what = Path(checkpoint or cfg.get('pretrained_model_name_or_path', '')).name
                bar = tqdm(evaluators, desc=f'eval {what}', unit='task', disable=not self.progress)
                for evaluator in bar:
                    bar.set_postfix_str(evaluator.label)
                    t0 = time.time()
                    with warnings.catch_warnings():
                        _quiet_known_warnings()
                        trainer.eval(eval_dataloader=evaluator)
                    self.last_seconds_by_task[evaluator.label] = round(time.time() - t0, 3)
                state = trainer.state
                out = self._results(state, heldout)
            finally:
                trainer.close()
                del trainer
        else:
            out = self._results(None, heldout)
        del model
        gc.collect()
        from foundry_upcycle.study.streaming_memory import release
        release()                               # orphaned attachments of the held-out splits' prefix search
        return out

    def _results(self, state, heldout: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {f'ce_{name}': h['ce'] for name, h in heldout.items()}
        out['heldout'] = {name: {'units': h['units'], 'unit': h['unit']} for name, h in heldout.items()}
        tasks, foundry = self._gauntlet_metrics(state)
        scores = gauntlet_scores(tasks)
        ours_of_foundry_rule = scores['core_average_foundry']
        for cat, entry in scores['categories'].items():
            entry['score_foundry'] = foundry.get(cat)
        kept = [c for c in scores['categories'] if c in foundry]
        # foundry reports 0.0 when it keeps no category; that is "no value", not a score
        scores['core_average_foundry'] = foundry.get('core_average') if kept else None
        if (ours_of_foundry_rule is None) != (scores['core_average_foundry'] is None) or (
                kept and abs(ours_of_foundry_rule - scores['core_average_foundry']) > 1e-5):
            log.warning('eval: foundry\'s EvalGauntlet gave core_average %s, gauntlet_scores %s',
                        scores['core_average_foundry'], ours_of_foundry_rule)
        prepared = self.prepared
        out.update(
            core_average=scores['core_average'],
            core_average_foundry=scores['core_average_foundry'],
            tasks=tasks,
            categories=scores['categories'],
            categories_dropped_by_foundry=[c for c in scores['categories'] if c not in foundry],
            categories_without_tasks=scores['categories_without_tasks'],
            missing_tasks=list(prepared.missing) if prepared else [],
            not_selected_tasks=list(prepared.not_selected) if prepared else [],
            icl_examples=dict(prepared.num_examples) if prepared else {},
            icl_too_long=dict(prepared.too_long) if prepared else {},
        )
        return out

    def _gauntlet_metrics(self, state) -> tuple[dict[str, float], dict[str, float]]:
        """(task -> accuracy, foundry's EvalGauntlet scores by category and 'core_average')."""
        if self.gauntlet is None or state is None:
            return {}, {}
        per_label = self.gauntlet.extract_metrics_from_state(state)  # 'copa/0-shot' -> acc, subcategories averaged
        tasks = {label.split('/')[0]: float(acc) for label, acc in per_label.items()}
        gauntlet_log = logging.getLogger('llmfoundry.callbacks.eval_gauntlet_callback')
        level = gauntlet_log.level
        gauntlet_log.setLevel(logging.ERROR)  # one warning per absent benchmark; we report them in the results
        try:
            scores = self.gauntlet.eval_after_all(state, None)  # type: ignore[arg-type]
        finally:
            gauntlet_log.setLevel(level)
        return tasks, {k[len(GAUNTLET_PREFIX):]: float(v) for k, v in scores.items()}


def _quiet_known_warnings() -> None:
    """Eval-only noise: no optimizer, a short last batch, foundry's padding-mask note (once per batch)."""
    for message in ('No optimizer was specified', 'Cannot split', 'Propagating key_padding_mask'):
        warnings.filterwarnings('ignore', message=message)


def _load_weights(model, checkpoint: Union[str, os.PathLike]) -> None:
    """Strict load of a Composer `.pt` (weights only) or safetensors file; a mismatch names the keys."""
    from foundry_upcycle.checkpoint_io import load_state_dict
    state_dict = load_state_dict(str(checkpoint), what='eval checkpoint')
    want = set(model.state_dict())
    missing, unexpected = sorted(want - set(state_dict)), sorted(set(state_dict) - want)
    if missing or unexpected:
        raise ValueError(
            f'eval checkpoint: {checkpoint} does not match the model config: missing {missing[:5]}'
            f'{" ..." if len(missing) > 5 else ""}, unexpected {unexpected[:5]}{" ..." if len(unexpected) > 5 else ""}'
            ' (is the model block the one it was trained with, e.g. the MoE ffn_config?)')
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f'eval checkpoint: {checkpoint} does not match the model config: {e}') from None


def evaluate_checkpoint(checkpoint: Union[str, os.PathLike], model_cfg: Mapping[str, Any],
                        tokenizer_dir: Union[str, os.PathLike], eval_data: Mapping[str, Union[str, os.PathLike]],
                        icl: Optional[GauntletSpec], seq_len: int, batch_size: int,
                        work_dir: Union[str, os.PathLike], progress: bool = True,
                        num_threads: Optional[int] = None,
                        doc_tokens: Optional[Mapping[str, Sequence[int]]] = None) -> dict[str, Any]:
    """One checkpoint's eval results: {'ce_<name>': .., 'core_average': .., 'core_average_foundry': ..,
    'tasks': {task: accuracy}, 'categories': {...}, ...}. For several checkpoints, reuse one `EvalSession`."""
    session = EvalSession(tokenizer_dir, eval_data, icl, seq_len, batch_size, work_dir, progress, num_threads,
                          doc_tokens)
    return session.evaluate(checkpoint, model_cfg)
