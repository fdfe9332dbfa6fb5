"""The study, stage by stage: data -> dense base -> (lr sweep) -> CPT and upcycling at matched FLOPs per budget and
seed -> evaluation -> step timing -> results.json -> (export + inference benchmark -> cost) -> report.md and plots.

One module per stage: `data` (corpora, tokenizer, MDS), `training` (foundry's train, run logs), `evaluate`
(held-out CE + gauntlet), `timing` (interleaved step times), `inference` (HF export + benchmark), `results`
(results.json, schema 2), `report` (markdown + plots); `stages` makes each resumable, `recipes` resolves a run's
foundry config. This module plans the runs and wires the stages together.

Every training run is foundry's own `train` on a shipped recipe (yamls/<scale>/{pretrain,cpt,upcycle}.yaml) with
its `variables` set, in this process (one `import llmfoundry`) or, with nproc > 1, under Composer's launcher.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from foundry_upcycle.study import training
from foundry_upcycle.study.config import StudyConfig, check_paths
from foundry_upcycle.study.recipes import RunSpec, build_recipe, moe_model_config, run_lr, warmup
from foundry_upcycle.study.results import WALL_CLOCK_FIELDS, build_results, study_notes, write_json
from foundry_upcycle.study.stages import Progress, StageResult, Stages, config_hash

log = logging.getLogger(__name__)

ARMS = ('cpt', 'upcycle')
ROUTER_POINTS = 50               # router metrics logged about this many times per upcycled run
__all__ = ['Study', 'run_study', 'WALL_CLOCK_FIELDS', 'ARMS']


@dataclass
class StudyPlan:
    """What is known before any training: resolved recipes' shapes, FLOPs per token, steps per arm, lrs."""
    seq_len: int
    tokens_per_step: int
    pretrain_steps: Optional[int]
    pretrain_tokens: int
    pretrain_lr: Optional[float]
    dense_model: dict[str, Any]
    moe_model: dict[str, Any]
    upcycle_block: dict[str, Any]
    flops: dict[str, float]
    params: dict[str, tuple[int, int]]
    token_ratio: float
    steps: dict[tuple[str, float], int]
    target_tokens: dict[tuple[str, float], int]
    lrs: dict[str, float]                         # each arm's phase-2 lr before any sweep


def timing_models(plan: StudyPlan) -> dict[str, dict[str, Any]]:
    """The two arms' model blocks as trained (the upcycled one with its load-balancing loss), torch backend."""
    from foundry_upcycle.config import UpcycleConfig
    from foundry_upcycle.transforms import upcycled_model_config
    return {'cpt': plan.dense_model,
            'upcycle': upcycled_model_config(plan.dense_model, UpcycleConfig.from_mapping(plan.upcycle_block), 'torch')}


def run_name(arm: str, budget: float, lr: float, seed_index: int) -> str:
    return f'{arm}-b{budget:g}-lr{lr:g}-s{seed_index}'


class Study:
    """Runs the stages of one StudyConfig; `run()` returns the results dict (also written to results.json)."""

    def __init__(self, cfg: StudyConfig):
        self.cfg = cfg
        self.out = Path(cfg.out).expanduser().absolute()
        self.progress = Progress(cfg.progress)
        self.stages = Stages(self.out, self.progress)
        self.nproc = cfg.nproc
        self.data = None          # DataArtifacts (tiny scale); None at paper scale (cfg.mds_dir)
        self.data_hash = ''
        self.data_seconds = 0.0
        self.plan: Optional[StudyPlan] = None
        self._sessions: dict[bool, Any] = {}
        self._all_stage_results: list[StageResult] = []

    # -------------------------------------------------------------- inputs

    def _data_paths(self) -> dict[str, Any]:
        if self.cfg.scale == 'tiny':
            a = self.data
            return {'tokenizer': str(a.tokenizer_dir), 'train': str(a.mds['domain']),
                    'pretrain': str(a.mds['generic']),
                    'val': {'generic': str(a.mds['generic'] / 'val'), 'domain': str(a.mds['domain'] / 'val')}}
        val = {'domain': str(Path(self.cfg.mds_dir) / 'val')}
        if self.cfg.generic_mds_dir:
            val['generic'] = str(Path(self.cfg.generic_mds_dir) / 'val')
        return {'tokenizer': str(Path(self.cfg.tokenizer).absolute()), 'train': str(Path(self.cfg.mds_dir).absolute()),
                'val': val}

    def _seq_len(self) -> Optional[int]:
        return self.cfg.max_seq_len or (self.cfg.data.max_seq_len if self.cfg.scale == 'tiny' else None)

    def _pretrain_steps(self, tokens_per_step: int, dense_params: int) -> int:
        cfg = self.cfg
        if cfg.pretrain_tokens_per_param:
            return max(1, round(cfg.pretrain_tokens_per_param[0] * dense_params / tokens_per_step))
        from foundry_upcycle.study.config import DEFAULT_PRETRAIN_STEPS
        return cfg.pretrain_steps or DEFAULT_PRETRAIN_STEPS

    def _spec(self, kind: str, steps: int, name: str, dense_checkpoint: Optional[str] = None,
              seed_index: int = 0, lr: Optional[float] = None) -> RunSpec:
        """One run. seed_index i (phase 2): data order seed cfg.seed + i, router seed block seed + i."""
        cfg, tiny = self.cfg, self.cfg.scale == 'tiny'
        dp = self._data_paths() if (self.data is not None or not tiny) else {}
        variables: dict[str, Any] = {'run_name': name, 'seed': cfg.seed + seed_index, 'max_duration': f'{steps}ba'}
        top: dict[str, Any] = {'eval_first': False, 'eval_interval': f'{steps}ba', 'eval_subset_num_batches': 8}
        settings: dict[str, Any] = {'variables': variables, 'top': top}
        display = {
            'progress_bar': cfg.progress and (self.nproc or 1) == 1, 'log_to_console': False,
            'console_log_interval': f'{max(1, steps // 10)}ba',
            'python_log_level': 'info' if logging.getLogger('foundry_upcycle').isEnabledFor(logging.DEBUG)
            else 'warning',
        }
        paths: dict[str, Any] = {'save_folder': '<unset>'}
        seq = self._seq_len()
        if seq:
            variables['max_seq_len'] = seq
        if cfg.global_batch_size:
            variables['global_batch_size'] = cfg.global_batch_size
        if kind == 'pretrain':
            if cfg.pretrain_lr:
                variables['lr'] = cfg.pretrain_lr
        elif kind == 'cpt':
            if lr is not None or cfg.lr:
                variables['lr'] = lr if lr is not None else cfg.lr
        else:
            if lr is not None or cfg.lr:
                variables['lr'] = lr if lr is not None else cfg.lr
            block: dict[str, Any] = {}
            if lr is not None:
                block['lr'] = lr
            if seed_index:
                base = cfg.upcycle.get('seed', self._recipe_block_seed())
                block['seed'] = int(base) + seed_index
            if block:
                settings['upcycle'] = block
            # router health (per-layer expert load, entropy, expert spread, LBL) into the run's jsonl log
            top['callbacks'] = {'upcycle_router_monitor': {'interval': max(1, steps // ROUTER_POINTS)}}
        if kind != 'pretrain':
            variables['warmup'] = warmup(steps, cfg.warmup_fraction)
            paths['dense_checkpoint'] = dense_checkpoint
        if tiny:
            variables.update(save_interval=f'{max(1, min(steps, 100))}ba', eval_interval=f'{steps}ba')
            if self.data is not None and 'vocab_size' not in cfg.model:
                top['model'] = {'vocab_size': self.data.vocab_size}
            pretrain = kind == 'pretrain'
            paths.update(data_dir=dp.get('pretrain' if pretrain else 'train'),
                         eval_data_dir=dp.get('train' if pretrain else 'pretrain'), tokenizer=dp.get('tokenizer'))
        else:
            paths.update(data_local=dp.get('train'), tokenizer_name=dp.get('tokenizer'))
            variables['tokenizer_kwargs'] = {'model_max_length': seq} if seq else {}
        return RunSpec(kind, settings, {'variables': paths}, display)

    def _recipe_block_seed(self) -> int:
        from omegaconf import OmegaConf as om
        raw = om.to_container(om.load(self.cfg.recipe_path('upcycle')), resolve=False)
        return int((raw.get('upcycle') or {}).get('seed', 0))

    def _resolve(self, spec: RunSpec, work: Optional[Path] = None, placeholders: bool = False) -> dict[str, Any]:
        import copy
        spec = copy.deepcopy(spec)
        if work is not None:
            spec.paths['variables']['save_folder'] = str(work / 'checkpoints')
        run = build_recipe(self.cfg, spec, placeholders)
        if work is not None:
            run['loggers'] = {**(run.get('loggers') or {}), 'jsonl': {'path': str(work / 'metrics.jsonl')}}
        else:
            run.pop('loggers', None)
        return run

    # -------------------------------------------------------------- planning (no training)

    def make_plan(self) -> StudyPlan:
        """Resolves the recipes and computes every arm's steps; ValueError for anything the recipes refuse."""
        from foundry_upcycle.study.flops import matched_tokens, param_counts, train_flops_per_token
        cfg = self.cfg
        cpt = self._resolve(self._spec('cpt', 1, 'plan', '<dense>'), placeholders=True)
        up = self._resolve(self._spec('upcycle', 1, 'plan', '<dense>'), placeholders=True)
        block = {k: v for k, v in up['upcycle'].items() if k != 'from'}
        dense_model = dict(cpt['model'])
        if up['model'] != dense_model:
            raise ValueError('recipes.cpt and recipes.upcycle must have the same model block (the upcycling recipe '
                             'is the CPT recipe plus one upcycle block)')
        moe_model = moe_model_config(dense_model, block)
        seq = int(cpt['max_seq_len'])
        tokens_per_step = int(cpt['global_train_batch_size']) * seq
        params = {'cpt': param_counts(dense_model), 'upcycle': param_counts(moe_model)}
        pretrain_steps, pretrain_lr = None, None
        if cfg.pretrains:
            pretrain_steps = self._pretrain_steps(tokens_per_step, params['cpt'][0])
            pre = self._resolve(self._spec('pretrain', pretrain_steps, 'plan'), placeholders=True)
            if int(pre['max_seq_len']) != seq or pre['model'] != dense_model:
                raise ValueError('recipes.pretrain and recipes.cpt must train the same model at the same max_seq_len '
                                 '(CPT continues the pretrained checkpoint)')
            pretrain_tokens = pretrain_steps * int(pre['global_train_batch_size']) * seq
            pretrain_lr = float(pre['optimizer']['lr'])
        else:
            pretrain_tokens = cfg.pretrain_tokens
        flops = {'cpt': train_flops_per_token(dense_model, seq), 'upcycle': train_flops_per_token(moe_model, seq)}
        steps, targets = {}, {}
        for b in cfg.budgets:
            tok = dict(zip(ARMS, matched_tokens(dense_model, moe_model, b, pretrain_tokens, seq)))
            for arm in ARMS:
                targets[(arm, b)] = tok[arm]
                steps[(arm, b)] = max(1, round(tok[arm] / tokens_per_step))
        lrs = {'cpt': run_lr(cpt), 'upcycle': cfg.upcycle_lr or run_lr(up)}
        return StudyPlan(seq, tokens_per_step, pretrain_steps, pretrain_tokens, pretrain_lr, dense_model, moe_model,
                         block, flops, params, flops['cpt'] / flops['upcycle'], steps, targets, lrs)

    # -------------------------------------------------------------- stages

    def stage_data(self) -> None:
        cfg = self.cfg
        if cfg.scale == 'tiny':
            from foundry_upcycle.study.data import prepare_data
            self.progress.stage('data: built-in corpora (or your text folders) -> tokenizer + MDS')
            t0 = time.monotonic()
            self.data = prepare_data(cfg.data, self.out / 'data', progress=cfg.progress)
            self.data_hash = self.data.config_hash
            self.data_seconds = round(time.monotonic() - t0, 2)
            return
        self.progress.stage(f'data: your MDS data in {cfg.mds_dir}')
        fp = {}
        for root in (cfg.mds_dir, cfg.generic_mds_dir):
            for split in (('train', 'val') if root else ()):
                index = Path(root) / split / 'index.json'
                if index.is_file():
                    fp[f'{"generic" if root == cfg.generic_mds_dir else "domain"}/{split}'] = hashlib.sha256(
                        index.read_bytes()).hexdigest()
        tok = Path(cfg.tokenizer)
        fp['tokenizer'] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(tok.glob('*.json'))}
        self.data_hash = config_hash(fp)

    def stage_dense(self) -> StageResult:
        cfg, plan = self.cfg, self.plan
        if not cfg.pretrains:
            st = Path(cfg.dense_checkpoint).expanduser().absolute().stat()
            inputs = {'checkpoint': str(Path(cfg.dense_checkpoint).absolute()), 'size': st.st_size,
                      'mtime_ns': st.st_mtime_ns, 'model': plan.dense_model, 'pretrain_tokens': plan.pretrain_tokens}
            return self.stages.run('dense', inputs, lambda work: {
                'checkpoint': inputs['checkpoint'], 'model': plan.dense_model, 'steps': None,
                'tokens': plan.pretrain_tokens}, what='dense base: your checkpoint')
        steps = plan.pretrain_steps
        spec = self._spec('pretrain', steps, 'dense')
        hashed = self._resolve(spec, placeholders=True)
        warm = (hashed.get('scheduler') or {}).get('t_warmup')
        if isinstance(warm, str) and warm.endswith('ba') and int(warm[:-2]) >= steps:
            log.warning('pretraining: the recipe\'s warmup %s is not shorter than the run (%d steps); using %s',
                        warm, steps, warmup(steps, cfg.warmup_fraction))
            spec.settings['top']['scheduler'] = {'t_warmup': warmup(steps, cfg.warmup_fraction)}
            hashed = self._resolve(spec, placeholders=True)

        def fn(work: Path) -> dict[str, Any]:
            run = self._resolve(spec, work)
            training.train_run(run, work, self.nproc, cfg.progress)
            ckpt = training.final_checkpoint(work / 'checkpoints', steps)
            return {'checkpoint': str(ckpt.relative_to(work)), 'model': run['model'], 'steps': steps,
                    'tokens': plan.pretrain_tokens,
                    **training.run_metrics(work / 'metrics.jsonl', plan.pretrain_tokens // steps)}
        return self.stages.run('dense', {'recipe': hashed, 'data': self.data_hash}, fn,
                               what=f'dense pretraining: {steps} steps, {plan.pretrain_tokens:,} tokens',
                               resumable=True)

    @staticmethod
    def _checkpoint(stage: StageResult) -> str:
        ckpt = Path(stage.outputs['checkpoint'])
        return str(ckpt if ckpt.is_absolute() else stage.dir / ckpt)

    def _arm_stage(self, arm: str, budget: float, dense: StageResult, seed_index: int, lr: float):
        """(stage name, hashed inputs, fn, description) of one phase-2 run."""
        plan, cfg = self.plan, self.cfg
        steps = plan.steps[(arm, budget)]
        name = run_name(arm, budget, lr, seed_index)
        spec = self._spec(arm, steps, name, self._checkpoint(dense), seed_index, lr)
        hashed = self._resolve(spec, placeholders=True)

        def fn(work: Path) -> dict[str, Any]:
            from foundry_upcycle.transforms import apply_upcycle_block
            run = self._resolve(spec, work)
            training.train_run(run, work, self.nproc, cfg.progress)
            ckpt = training.final_checkpoint(work / 'checkpoints', steps)
            model = apply_upcycle_block(run)['model'] if arm == 'upcycle' else run['model']
            return {'checkpoint': str(ckpt.relative_to(work)), 'model': model, 'steps': steps,
                    'tokens': steps * plan.tokens_per_step, 'lr': run_lr(run), 'seed': run['seed'],
                    'router_seed': (run.get('upcycle') or {}).get('seed'),
                    **training.run_metrics(work / 'metrics.jsonl', plan.tokens_per_step)}
        label = 'CPT' if arm == 'cpt' else 'upcycling'
        what = (f'{label} @ budget {budget:g}, lr {lr:g}, seed {seed_index}: {steps} steps, '
                f'{steps * plan.tokens_per_step:,} tokens')
        return f'arms/{name}', {'recipe': hashed, 'data': self.data_hash, 'dense': dense.hash}, fn, what

    def stage_arm(self, arm: str, budget: float, dense: StageResult, seed_index: int, lr: float) -> StageResult:
        name, inputs, fn, what = self._arm_stage(arm, budget, dense, seed_index, lr)
        return self.stages.run(name, inputs, fn, what=what, resumable=True)

    def jobs(self) -> int:
        """Phase-2 runs trained at once: cfg.jobs, else one per free core (at cfg.threads each) on a CPU-only tiny
        study, at most 8; always 1 when a run uses several processes (Composer's launcher), or a GPU by default."""
        if (self.nproc or 1) > 1:
            if (self.cfg.jobs or 1) > 1:
                log.warning('jobs %d ignored: each run already uses %d processes', self.cfg.jobs, self.nproc)
            return 1
        if self.cfg.jobs is not None:
            return self.cfg.jobs
        if self.cfg.scale != 'tiny' or training.visible_gpus():
            return 1
        cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
        return max(1, min(8, cores // (self.cfg.threads or cores)))

    def train_arms(self, keys: list[tuple[str, float, int, float]], dense: StageResult, icl: bool) -> None:
        """Trains the unfinished phase-2 runs among `keys` (arm, budget, seed index, lr) in worker processes, `jobs()`
        at a time (study/workers.py), each followed by its evaluation (with the gauntlet if `icl`); the stage_arm
        and stage_eval calls that follow find them done. Nothing to do with one job."""
        jobs = self.jobs()
        todo = [k for k in keys if not self.stages.done(*self._arm_stage(k[0], k[1], dense, k[2], k[3])[:2])]
        if jobs <= 1 or len(todo) < 2:
            return
        todo.sort(key=lambda k: -k[1])   # the longest first (a run's FLOPs grow with its budget): shortest makespan
        from foundry_upcycle.study.workers import train_in_workers
        self.progress.say(f'training {len(todo)} phase-2 run(s), {min(jobs, len(todo))} at a time in worker '
                          f'processes ({self.cfg.threads or "default"} torch thread(s) each)')

        def done(key: tuple[str, float, int, float], seconds: float) -> None:
            arm, budget, seed_index, lr = key
            name = run_name(arm, budget, lr, seed_index)
            self.stages.ran_in_workers.update({f'arms/{name}', f'{"eval" if icl else "eval-ce"}/{name}'})
            self.progress.say(f'  {"CPT" if arm == "cpt" else "upcycling"} @ budget {budget:g}, seed {seed_index}: '
                              f'done in {seconds:.0f}s')
        train_in_workers(self.cfg, todo, min(jobs, len(todo)), icl, done)

    def _eval_session(self, icl: bool = True):
        if icl not in self._sessions:
            from foundry_upcycle.study.evaluate import EvalSession
            dp = self._data_paths()
            self._sessions[icl] = EvalSession(dp['tokenizer'], dp['val'], self._gauntlet_spec() if icl else None,
                                              self.plan.seq_len, self.cfg.eval.batch_size,
                                              self.out / ('.eval-work' if icl else '.eval-work-ce'), self.cfg.progress)
        return self._sessions[icl]

    def _gauntlet_spec(self):
        from foundry_upcycle.study.gauntlet import GauntletSpec
        local = self.cfg.eval.resolved_local_data()
        if local is None:
            return None
        e = self.cfg.eval
        return GauntletSpec(local_data=local, tasks=e.tasks, max_examples_per_task=e.max_examples_per_task,
                            seed=e.seed)

    def stage_eval(self, name: str, model_stage: StageResult, icl: bool = True) -> StageResult:
        e = self.cfg.eval
        inputs = {'model': model_stage.hash, 'data': self.data_hash, 'seq_len': self.plan.seq_len,
                  'batch_size': e.batch_size}
        if icl:
            inputs.update(local_data=e.local_data_id(), tasks=e.tasks, max_examples_per_task=e.max_examples_per_task,
                          seed=e.seed)

        def fn(work: Path) -> dict[str, Any]:
            session = self._eval_session(icl)
            res = session.evaluate(self._checkpoint(model_stage), model_stage.outputs['model'])
            res['eval_seconds'] = session.last_seconds
            res['eval_seconds_by_task'] = session.last_seconds_by_task
            (work / 'eval.json').write_text(json.dumps(res, indent=1, sort_keys=True) + '\n')
            return res
        folder = 'eval' if icl else 'eval-ce'
        return self.stages.run(f'{folder}/{name}', inputs, fn,
                               what=f'evaluate {name}' + ('' if icl else ' (held-out CE only)'))

    def stage_lr_sweep(self, dense: StageResult) -> dict[str, Any]:
        """Each arm at every lr of cfg.lr_sweep, smallest budget, seed 0; the best held-out domain CE wins."""
        cfg = self.cfg
        b0 = min(cfg.budgets)
        rows = []
        self.train_arms([(arm, b0, 0, lr) for lr in cfg.lr_sweep for arm in ARMS], dense, icl=False)
        for lr in cfg.lr_sweep:
            row: dict[str, Any] = {'lr': lr}
            for arm in ARMS:
                st = self.stage_arm(arm, b0, dense, 0, lr)
                ev = self.stage_eval(run_name(arm, b0, lr, 0), st, icl=False)
                row[arm] = ev.outputs.get('ce_domain')
            rows.append(row)
        chosen, edge = {}, []
        for arm in ARMS:
            scored = [(r[arm], r['lr']) for r in rows if r[arm] is not None and math.isfinite(r[arm])]
            if not scored:
                raise RuntimeError(f'lr sweep: no finite held-out domain CE for {arm}')
            chosen[arm] = min(scored)[1]
            if chosen[arm] in (min(cfg.lr_sweep), max(cfg.lr_sweep)):
                edge.append(arm)
                log.warning('lr sweep: the best lr for %s (%g) is at the edge of the sweep %s; the optimum may lie '
                            'outside it', arm, chosen[arm], list(cfg.lr_sweep))
        return {'budget': b0, 'rows': rows, 'chosen': chosen, 'at_edge': edge}

    def stage_timing(self, dense: StageResult) -> Optional[StageResult]:
        plan, cfg = self.plan, self.cfg
        models = timing_models(plan)
        batch = plan.tokens_per_step // plan.seq_len
        inputs = {'models': models, 'batch': batch, 'seq_len': plan.seq_len, 'threads': cfg.threads,
                  'tokenizer': self.data_hash}

        def fn(work: Path) -> dict[str, Any]:
            from foundry_upcycle.study.timing import measure_step_times
            res = measure_step_times(models, self._data_paths()['tokenizer'], batch, plan.seq_len, cfg.threads)
            (work / 'timing.json').write_text(json.dumps(res, indent=1) + '\n')
            return res
        return self.stages.run('timing', inputs, fn, what='step timing: both arms, interleaved, after warm-up')

    def stage_inference(self, cpt: StageResult, up: StageResult) -> StageResult:
        import dataclasses
        inf = self.cfg.inference
        inputs = {'cpt': cpt.hash, 'upcycle': up.hash, 'settings': dataclasses.asdict(inf), 'threads': self.cfg.threads,
                  'tokenizer': self.data_hash}

        def fn(work: Path) -> dict[str, Any]:
            from foundry_upcycle.study.inference import export_and_benchmark
            return export_and_benchmark(self, cpt, up, work)
        return self.stages.run('inference', inputs, fn, what='export to Hugging Face + inference benchmark')

    # -------------------------------------------------------------- run

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        check_paths(cfg)
        from foundry_upcycle.study.evaluate import set_offline_env
        from foundry_upcycle.study.workers import serialize_streaming_prefix
        set_offline_env()
        serialize_streaming_prefix()
        if cfg.scale == 'tiny' and cfg.eval.resolved_local_data() is None:
            log.warning('eval: no ICL data (eval.local_data %s); cross-entropy only, no core average',
                        cfg.eval.local_data)
        import torch
        threads = torch.get_num_threads()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        try:
            return self._run()
        finally:
            torch.set_num_threads(threads)

    def _count_stages(self) -> int:
        cfg = self.cfg
        runs = sum(cfg.seeds_at(b) for b in cfg.budgets) * 2
        sweep = 4 * len(cfg.lr_sweep)
        return 2 + 2 * runs + 1 + sweep + int(cfg.timing) + 1 + (0 if cfg.inference.skip else 2) + 1

    def _run(self) -> dict[str, Any]:
        from foundry_upcycle.study.timing import load_average
        cfg = self.cfg
        self.load_start = load_average()
        self.progress.total = self._count_stages()
        self.plan = self.make_plan()  # fails on bad recipes / overrides before the data is built
        self.stage_data()
        if self.nproc is None:
            self.nproc = max(1, training.visible_gpus()) if cfg.scale != 'tiny' else 1
        self.plan = p = self.make_plan()
        self.progress.say(
            f'plan: dense {p.params["cpt"][0]:,} params, upcycled {p.params["upcycle"][0]:,} total / '
            f'{p.params["upcycle"][1]:,} active; training FLOPs per token {p.flops["cpt"]:.3g} (dense) vs '
            f'{p.flops["upcycle"]:.3g} (upcycled): upcycled/CPT token ratio at matched FLOPs {p.token_ratio:.3f}')
        if p.pretrain_steps:
            self.progress.say(f'  dense base: {p.pretrain_steps} steps, {p.pretrain_tokens:,} tokens = '
                              f'{p.pretrain_tokens / p.params["cpt"][0]:.1f} tokens per parameter')
        for b in cfg.budgets:
            self.progress.say(f'  budget {b:g}: CPT {p.steps[("cpt", b)]} steps, upcycling '
                              f'{p.steps[("upcycle", b)]} steps ({p.tokens_per_step:,} tokens per step), '
                              f'{cfg.seeds_at(b)} seed(s)')
        dense = self.stage_dense()
        sweep = self.stage_lr_sweep(dense) if cfg.lr_sweep else None
        lrs = sweep['chosen'] if sweep else dict(p.lrs)
        self.progress.say(f'phase-2 lrs: CPT {lrs["cpt"]:g}, upcycling {lrs["upcycle"]:g} '
                          f'({"chosen by the sweep" if sweep else "the recipes / flags"})')
        self.train_arms([(arm, b, i, lrs[arm]) for b in cfg.budgets for i in range(cfg.seeds_at(b)) for arm in ARMS],
                        dense, icl=True)
        runs = {(arm, b, i): self.stage_arm(arm, b, dense, i, lrs[arm])
                for b in cfg.budgets for i in range(cfg.seeds_at(b)) for arm in ARMS}
        dense_eval = self.stage_eval('dense', dense)
        evals = {key: self.stage_eval(run_name(key[0], key[1], lrs[key[0]], key[2]), st) for key, st in runs.items()}
        timing = self.stage_timing(dense) if cfg.timing else None
        self._all_stage_results = [dense, *runs.values(), dense_eval, *evals.values()] + ([timing] if timing else [])
        results = build_results(self, dense, dense_eval, runs, evals, lrs, sweep, timing)
        inference = None
        if not cfg.inference.skip:
            top = max(cfg.budgets)
            inference = self.stage_inference(runs[('cpt', top, 0)], runs[('upcycle', top, 0)])
            results['wall_clock']['stages_s']['inference'] = inference.seconds
        results['wall_clock'].update(elapsed_s=round(self.progress.elapsed(), 1), jobs=self.jobs(),
                                     load_average_start=self.load_start,
                                     load_average_end=load_average(), cpu_count=os.cpu_count())
        results_path = self.out / 'results.json'
        self.progress.stage(f'results: {results_path}')
        write_json(results_path, results)
        sections = []
        if inference is not None:
            sections.append(self.stage_cost(results_path, inference))
        sections.append(study_notes(results, self))
        self.progress.stage('report: report.md and plots')
        from foundry_upcycle.study.report import write_report
        report = write_report(results, self.out, extra_sections=sections)
        self._summary(results, report)
        return results

    def stage_cost(self, results_path: Path, inference: StageResult) -> str:
        """Runs the cost report; returns its markdown section (or a note why there is none)."""
        from foundry_upcycle.bench.cost import cost_report, render_cost_section
        self.progress.stage('cost: training + inference compute')
        inference_json = inference.dir / inference.outputs['inference_json']
        try:
            cost = cost_report(str(results_path), str(inference_json), str(self.out / 'cost'))
        except ValueError as e:
            log.warning('cost report not written: %s', e)
            return f'## Inference cost\n\nThe cost report could not be computed: {e}\n'
        text = render_cost_section(cost)
        figures = [f'![Latency vs throughput](inference/{inference.outputs["figure"]})',
                   '![Break-even](cost/cost_breakeven.png)']
        return (text.rstrip('\n') + '\n\n' + '\n\n'.join(figures) + '\n\nMeasured throughput table: '
                '[inference/max_throughput.md](inference/max_throughput.md); cost details: cost/cost.json.\n')

    def _summary(self, results: dict[str, Any], report: Path) -> None:
        from foundry_upcycle.study.report import ce_winner
        self.progress.say(f'upcycled/CPT token ratio at matched FLOPs: {results["token_ratio"]:.3f}')
        for b in results['budgets']:
            _, text = ce_winner(results, b)
            self.progress.say(f'  held-out domain CE at budget {b:g}: {text.replace("**", "")}')
        from foundry_upcycle.study.timing import load_average
        self.progress.say(f'ran {len(self.stages.ran)} stage(s), skipped {len(self.stages.skipped)}; '
                          f'total {self.progress.elapsed():.0f}s on {os.cpu_count()} CPUs, load average (1/5/15 min) '
                          f'{self.load_start} at the start, {load_average()} at the end; report: {report}')


def run_study(cfg: StudyConfig) -> dict[str, Any]:
    """Runs (or resumes) the study; returns the results dict, also written to `<out>/results.json`. With several
    pretraining lengths (`pretrain_tokens_per_param`), one study per length in `<out>/tpp<N>/` and a comparison."""
    if not cfg.regimes:
        return Study(cfg).run()
    from foundry_upcycle.study.regimes import run_regimes
    return run_regimes(cfg)
