"""The study, stage by stage: data -> dense base -> (lr sweep) -> every arm at matched FLOPs per budget and seed ->
evaluation -> step timing -> results.json -> (export + inference benchmark -> cost) -> report.md and plots.

One module per job: `data` (corpora, tokenizer, MDS), `plan` (each arm's steps at matched FLOPs), `recipes` (a run's
foundry config), `training` (foundry's train, run logs), `evaluate` (held-out CE + gauntlet), `lr_select` (the lr
sweep), `timing` (interleaved step times), `inference` (HF export + benchmark), `results` (results.json), `report`
(markdown + plots); `stages` makes each resumable, `workers` trains phase-2 runs in parallel processes, `regimes`
runs one study per base length. This module wires the stages together.

Every training run is foundry's own `train` on a shipped recipe (yamls/<scale>/{pretrain,cpt,upcycle}.yaml) with
its `variables` set, in this process (one `import llmfoundry`) or, with nproc > 1, under Composer's launcher.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Optional

from foundry_upcycle.study import arms, hf_base, training
from foundry_upcycle.study.arms import run_name
from foundry_upcycle.study.config import StudyConfig, check_paths
from foundry_upcycle.study.plan import StudyPlan, make_plan, timing_models
from foundry_upcycle.study.recipes import RunBuilder, run_lr, warmup
from foundry_upcycle.study.notes import study_notes
from foundry_upcycle.study.results import WALL_CLOCK_FIELDS, build_results, write_json
from foundry_upcycle.study.stages import Progress, StageResult, Stages, code_salt, config_hash

log = logging.getLogger(__name__)

__all__ = ['Study', 'run_study', 'WALL_CLOCK_FIELDS']


class Study:
    """Runs the stages of one StudyConfig; `run()` returns the results dict (also written to results.json)."""

    def __init__(self, cfg: StudyConfig):
        self.cfg = cfg
        self.out = Path(cfg.out).expanduser().absolute()
        self.progress = Progress(cfg.progress)
        recipes = {k: cfg.recipe_path(k) for k in (('pretrain',) if cfg.pretrains else ()) + ('cpt', 'upcycle')}
        self.stages = Stages(self.out, self.progress, code_salt(recipes))
        self.nproc = cfg.nproc
        self.data = None          # DataArtifacts (tiny scale); None at paper scale (cfg.mds_dir)
        self.data_hash = ''
        self.data_seconds = 0.0
        self.plan: Optional[StudyPlan] = None
        self._sessions: dict[bool, Any] = {}
        self._all_stage_results: list[StageResult] = []

    # -------------------------------------------------------------- inputs

    @property
    def runs(self) -> RunBuilder:
        return RunBuilder(self.cfg, self.data, self.nproc)

    def _data_paths(self) -> dict[str, Any]:
        return self.runs.data_paths()

    def _pretrain_steps(self, tokens_per_step: int, dense_params: int) -> int:
        cfg = self.cfg
        if cfg.pretrain_tokens_per_param:
            return max(1, round(cfg.pretrain_tokens_per_param[0] * dense_params / tokens_per_step))
        from foundry_upcycle.study.config import DEFAULT_PRETRAIN_STEPS
        return cfg.pretrain_steps or DEFAULT_PRETRAIN_STEPS

    def make_plan(self) -> StudyPlan:
        """Resolves the recipes and computes every arm's steps; ValueError for anything the recipes refuse."""
        return make_plan(self.runs, self._pretrain_steps)

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
            for split in (('train', 'val', 'test') if root else ()):
                index = Path(root) / split / 'index.json'
                if index.is_file():
                    fp[f'{"generic" if root == cfg.generic_mds_dir else "domain"}/{split}'] = hashlib.sha256(
                        index.read_bytes()).hexdigest()
        tok = Path(cfg.tokenizer)
        fp['tokenizer'] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(tok.glob('*.json'))}
        self.data_hash = config_hash(fp)

    def stage_dense(self) -> StageResult:
        cfg, plan = self.cfg, self.plan
        if cfg.hf_base:
            inputs = {'hf_base': hf_base.fingerprint(cfg.hf_base), 'model': plan.dense_model,
                      'pretrain_tokens': plan.pretrain_tokens}
            return self.stages.run('dense', inputs, lambda work: hf_base.dense_outputs(
                cfg.hf_base, plan.dense_model, plan.pretrain_tokens), what=f'dense base: {cfg.hf_base}')
        if not cfg.pretrains:
            st = Path(cfg.dense_checkpoint).expanduser().absolute().stat()
            inputs = {'checkpoint': str(Path(cfg.dense_checkpoint).absolute()), 'size': st.st_size,
                      'mtime_ns': st.st_mtime_ns, 'model': plan.dense_model, 'pretrain_tokens': plan.pretrain_tokens}
            return self.stages.run('dense', inputs, lambda work: {
                'checkpoint': inputs['checkpoint'], 'model': plan.dense_model, 'steps': None,
                'tokens': plan.pretrain_tokens}, what='dense base: your checkpoint')
        steps = plan.pretrain_steps
        spec = self.runs.spec('pretrain', steps, 'dense')
        hashed = self.runs.resolve(spec, placeholders=True)
        warm = (hashed.get('scheduler') or {}).get('t_warmup')
        if isinstance(warm, str) and warm.endswith('ba') and int(warm[:-2]) >= steps:
            log.warning('pretraining: the recipe\'s warmup %s is not shorter than the run (%d steps); using %s',
                        warm, steps, warmup(steps, cfg.warmup_fraction))
            spec.settings['top']['scheduler'] = {'t_warmup': warmup(steps, cfg.warmup_fraction)}
            hashed = self.runs.resolve(spec, placeholders=True)

        def fn(work: Path) -> dict[str, Any]:
            run = self.runs.resolve(spec, work)
            training.train_run(run, work, self.nproc, cfg.progress)
            ckpt = training.final_checkpoint(work / 'checkpoints', steps)
            return {'checkpoint': str(ckpt.relative_to(work)), 'model': run['model'], 'steps': steps,
                    'tokens': plan.pretrain_tokens,
                    **training.run_metrics(work / 'metrics.jsonl', plan.pretrain_tokens // steps)}
        return self.stages.run('dense', {'recipe': hashed, 'data': self.data_hash}, fn,
                               what=f'dense pretraining: {steps} steps, {plan.pretrain_tokens:,} tokens',
                               resumable=True)

    @staticmethod
    def _checkpoint(stage: StageResult) -> Optional[str]:
        """The stage's checkpoint; None for a base given as a Hugging Face directory (its model block reads it)."""
        if stage.outputs['checkpoint'] is None:
            return None
        ckpt = Path(stage.outputs['checkpoint'])
        return str(ckpt if ckpt.is_absolute() else stage.dir / ckpt)

    def _arm_stage(self, arm: str, budget: float, dense: StageResult, seed_index: int, lr: float):
        """(stage name, hashed inputs, fn, description) of one phase-2 run."""
        plan, cfg = self.plan, self.cfg
        steps = plan.steps[(arm, budget)]
        name = run_name(arm, budget, lr, seed_index)
        spec = self.runs.spec(arm, steps, name, self._checkpoint(dense), seed_index, lr)
        hashed = self.runs.resolve(spec, placeholders=True)

        def fn(work: Path) -> dict[str, Any]:
            from foundry_upcycle.transforms import apply_upcycle_block
            run = self.runs.resolve(spec, work)
            training.train_run(run, work, self.nproc, cfg.progress)
            ckpt = training.final_checkpoint(work / 'checkpoints', steps)
            model = apply_upcycle_block(run)['model'] if arms.get(arm).is_moe else run['model']
            saved = {'hf': str(hf_base.saved_hf_dir(work, steps).relative_to(work))} if cfg.hf_base else {}
            return {'checkpoint': str(ckpt.relative_to(work)), 'model': model, 'steps': steps, **saved,
                    'tokens': steps * plan.tokens_per_step, 'lr': run_lr(run), 'seed': run['seed'],
                    'router_seed': (run.get('upcycle') or {}).get('seed'),
                    **training.run_metrics(work / 'metrics.jsonl', plan.tokens_per_step)}
        what = (f'{arms.short(arm)} @ budget {budget:g}, lr {lr:g}, seed {seed_index}: {steps} steps, '
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
        if self.cfg.scale != 'tiny' or self.cfg.hf_base or training.visible_gpus():
            return 1            # a real base: one run's memory is the box's to use
        cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
        return max(1, min(8, cores // (self.cfg.threads or cores)))

    def train_arms(self, keys: list[tuple[str, float, int, float]], dense: StageResult,
                   icl: bool | dict[tuple[str, float, int, float], bool]) -> None:
        """Trains the unfinished phase-2 runs among `keys` (arm, budget, seed index, lr) in worker processes, `jobs()`
        at a time (study/workers.py), each followed by its evaluation (with the gauntlet if `icl`, or `icl[key]`);
        the stage_arm and stage_eval calls that follow find them done. Nothing to do with one job."""
        icl_of = icl if isinstance(icl, dict) else {k: icl for k in keys}
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
            self.stages.ran_in_workers.update({f'arms/{name}', f'{"eval" if icl_of[key] else "eval-ce"}/{name}'})
            self.progress.say(f'  {arms.short(arm)} @ budget {budget:g}, seed {seed_index}: '
                              f'done in {seconds:.0f}s')
        train_in_workers(type(self), self.cfg, todo, min(jobs, len(todo)), icl_of, done)

    def _eval_sets(self, icl: bool) -> dict[str, str]:
        """The held-out splits an evaluation reads: all of them with the gauntlet (a main run), else only the
        domain's validation split (an lr sweep run)."""
        sets = self._data_paths()['eval']
        return sets if icl else {'domain_val': sets['domain_val']}

    def _eval_session(self, icl: bool = True):
        if icl not in self._sessions:
            from foundry_upcycle.study.evaluate import EvalSession
            info = self.runs.eval_sets()
            sets = self._eval_sets(icl)
            self._sessions[icl] = EvalSession(
                self._data_paths()['tokenizer'], sets, self._gauntlet_spec() if icl else None, self.plan.seq_len,
                self.cfg.eval.batch_size, self.out / ('.eval-work' if icl else '.eval-work-ce'), self.cfg.progress,
                doc_tokens={k: info[k]['doc_tokens'] for k in sets if info[k]['doc_tokens']})
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
                  'batch_size': e.batch_size, 'sets': sorted(self._eval_sets(icl))}
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

    def stage_timing(self, dense: StageResult) -> Optional[StageResult]:
        plan, cfg = self.plan, self.cfg
        models = timing_models(plan)
        batch = plan.tokens_per_step // plan.seq_len
        inputs = {'models': models, 'batch': batch, 'seq_len': plan.seq_len, 'threads': cfg.threads,
                  'tokenizer': self.data_hash}

        def fn(work: Path) -> dict[str, Any]:
            from foundry_upcycle.study.timing import measure_step_times
            real = {a: hf_base.with_base(m, cfg.hf_base) for a, m in models.items()} if cfg.hf_base else models
            res = measure_step_times(real, self._data_paths()['tokenizer'], batch, plan.seq_len, cfg.threads)
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
        runs = sum(cfg.seeds_at(b) for b in cfg.budgets) * len(cfg.arms)
        check = {'both': 3, 'up': 2}.get(cfg.lr_check, 0)        # runs per arm at the largest budget (one reused)
        sweep = 2 * len(cfg.arms) * (len(cfg.lr_grid) + cfg.lr_extend + check) if cfg.lr_grid else 0
        return 2 + 2 * runs + 1 + sweep + int(cfg.timing) + 1 + (0 if cfg.inference.skip else 2) + 1

    def _run(self) -> dict[str, Any]:
        from foundry_upcycle.study.timing import load_average
        cfg = self.cfg
        self.load_start = load_average()
        self.progress.total = self._count_stages()
        self.plan = self.make_plan()  # fails on bad recipes / overrides before the data is built
        self.stage_data()
        if self.nproc is None:
            self.nproc = max(1, training.visible_gpus()) if (cfg.scale != 'tiny' or cfg.hf_base) else 1
        self.plan = self.make_plan()
        self._say_plan(self.plan)
        dense = self.stage_dense()
        lrs, sweep, runs, evals = self._phase2(dense)
        dense_eval = self.stage_eval('dense', dense)
        timing = self.stage_timing(dense) if cfg.timing else None
        self._all_stage_results = [dense, *runs.values(), dense_eval, *evals.values()] + ([timing] if timing else [])
        results = build_results(self, dense, dense_eval, runs, evals, lrs, sweep, timing)
        inference = None
        if not cfg.inference.skip:
            top = max(cfg.budgets)
            inference = self.stage_inference(runs[(arms.BASELINE, top, 0)], runs[(arms.PRIMARY, top, 0)])
            results['wall_clock']['stages_s']['inference'] = inference.seconds
        results['wall_clock'].update(elapsed_s=round(self.progress.elapsed(), 1), jobs=self.jobs(),
                                     load_average_start=self.load_start,
                                     load_average_end=load_average(), cpu_count=os.cpu_count())
        results_path = self.out / 'results.json'
        self.progress.stage(f'results: {results_path}')
        write_json(results_path, results)
        sections = []
        if inference is not None:
            from foundry_upcycle.study.inference import cost_section
            self.progress.stage('cost: training + inference compute')
            sections.append(cost_section(results_path, inference, self.out / 'cost'))
        sections.append(study_notes(results, self))
        self.progress.stage('report: report.md and plots')
        from foundry_upcycle.study.report import write_report
        report = write_report(results, self.out, extra_sections=sections)
        self._summary(results, report)
        return results

    def _phase2(self, dense: StageResult) -> tuple[dict[str, float], Optional[dict[str, Any]], dict, dict]:
        """lr choice on validation (study/lr_select.py), then every arm x budget x seed, trained (with the lr check
        at the largest budget) and evaluated: (lrs, sweep, runs, evals), runs and evals keyed (arm, budget, i)."""
        from foundry_upcycle.study.lr_select import check_at_top, check_keys, select_lrs
        cfg = self.cfg
        sweep = select_lrs(self, dense) if cfg.lr_grid else None
        lrs = sweep['chosen'] if sweep else dict(self.plan.lrs)
        self.progress.say('phase-2 lrs: ' + ', '.join(f'{arms.short(a)} {lrs[a]:g}' for a in cfg.arms) +
                          f' ({"chosen on the validation split" if sweep else "the recipes / flags"})')
        keys = [(arm, b, i, lrs[arm]) for b in cfg.budgets for i in range(cfg.seeds_at(b)) for arm in cfg.arms]
        extra = check_keys(self, sweep) if sweep else []
        self.train_arms(keys + extra, dense, icl={**{k: True for k in keys}, **{k: False for k in extra}})
        runs = {k[:3]: self.stage_arm(*k[:2], dense, k[2], k[3]) for k in keys}
        evals = {k[:3]: self.stage_eval(run_name(*k[:2], k[3], k[2]), runs[k[:3]]) for k in keys}
        if sweep:
            sweep['check'] = check_at_top(self, sweep, dense)
        return lrs, sweep, runs, evals

    def _say_plan(self, p: StudyPlan) -> None:
        from foundry_upcycle.study.notes import plan_lines
        for line in plan_lines(p, self.cfg):
            self.progress.say(line)

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
    return run_regimes(cfg, lambda sub: Study(sub).run())
