"""The study, stage by stage: data -> dense base -> CPT and upcycling at matched FLOPs per budget -> evaluation
-> results.json -> (export + inference benchmark -> cost) -> report.md and plots.

Every training run is foundry's own `train` on a shipped recipe (yamls/<scale>/{pretrain,cpt,upcycle}.yaml) with
its `variables` set, in this process (one `import llmfoundry`) or, with nproc > 1, under Composer's launcher
(`python -m composer.cli.launcher -n N -c llmfoundry train <yaml>`).

Resumable stages: stage `name` lives in `<out>/<name>/` with a `stage.json` holding a hash of its inputs (the
fully resolved training config with paths left out, and the hashes of the stages it reads). A finished stage whose
hash matches is skipped; a changed one is redone, and so is everything downstream, whose hashes include it. A stage
builds in `<out>/.<name>.partial-<hash>/` and is renamed into place when done; a killed training stage resumes
from its own checkpoints (the recipes set `autoresume: true`), any other stage starts over.
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import hashlib
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from foundry_upcycle.atomic import atomic_write
from foundry_upcycle.study.config import StudyConfig, check_paths

log = logging.getLogger(__name__)

STUDY_FORMAT = 1                 # bump when a stage's outputs change meaning
ARMS = ('cpt', 'upcycle')
CE_WINDOW = 50                   # the paper's training CE: mean over the final 50 steps
TRAIN_CE_KEYS = ('metrics/train/LanguageCrossEntropy', 'loss/train/loss', 'loss/train/total')
THROUGHPUT_KEY = 'throughput/tokens_per_sec'
# results.json fields that hold measured time; everything else is a function of the config and seed.
WALL_CLOCK_FIELDS = ('wall_clock', 'arms[].tokens_per_s', 'arms[].step_time_s', 'arms[].train_seconds')


# ----------------------------------------------------------------------------------------------- progress


class Progress:
    """One line per stage on stderr: elapsed time, stage number, what runs or why it is skipped."""

    def __init__(self, enabled: bool, total: int = 0):
        self.enabled, self.total, self.done = enabled, total, 0
        self.start = time.monotonic()

    def say(self, msg: str) -> None:
        if self.enabled:
            print(f'[study {self.elapsed():6.0f}s] {msg}', file=sys.stderr, flush=True)

    def stage(self, msg: str) -> None:
        self.done += 1
        self.say(f'({self.done}/{self.total}) {msg}')

    def elapsed(self) -> float:
        return time.monotonic() - self.start


# ----------------------------------------------------------------------------------------------- stages


def config_hash(inputs: Any) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class StageResult:
    name: str
    hash: str
    dir: Path
    outputs: dict[str, Any]
    seconds: float
    ran: bool


class Stages:
    """Runs `fn(work_dir) -> outputs` for a stage unless `<out>/<name>/stage.json` holds the same input hash."""

    def __init__(self, out: Path, progress: Progress):
        self.out, self.progress = out, progress
        self.ran: list[str] = []
        self.skipped: list[str] = []

    def read(self, name: str) -> Optional[dict[str, Any]]:
        try:
            meta = json.loads((self.out / name / 'stage.json').read_text())
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) and meta.get('status') == 'done' else None

    def run(self, name: str, inputs: Mapping[str, Any], fn: Callable[[Path], dict[str, Any]], what: str,
            resumable: bool = False) -> StageResult:
        """resumable: a killed run's work folder is kept and `fn` resumes in it (foundry autoresume)."""
        final = self.out / name
        h = config_hash({'format': STUDY_FORMAT, 'stage': name, **inputs})
        meta = self.read(name)
        if meta is not None and meta.get('hash') == h and _outputs_present(final, meta['outputs']):
            self.progress.stage(f'{what}: up to date, skipped ({final}, config {h})')
            self.skipped.append(name)
            return StageResult(name, h, final, meta['outputs'], meta.get('seconds', 0.0), ran=False)
        why = 'config changed, redoing' if meta is not None else 'running'
        self.progress.stage(f'{what}: {why}')
        final.parent.mkdir(parents=True, exist_ok=True)
        work = final.parent / f'.{final.name}.partial-{h}'
        for stale in final.parent.glob(f'.{final.name}.partial-*'):
            if stale != work:
                shutil.rmtree(stale, ignore_errors=True)
        if work.exists() and not resumable:
            shutil.rmtree(work)
        if work.exists():
            self.progress.say(f'  resuming from {work}')
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        outputs = fn(work)
        seconds = round(time.monotonic() - t0, 2)
        meta = {'stage': name, 'status': 'done', 'hash': h, 'seconds': seconds, 'inputs': inputs, 'outputs': outputs}
        (work / 'stage.json').write_text(json.dumps(meta, indent=1, sort_keys=True, default=str) + '\n')
        _swap_into_place(work, final)
        self.ran.append(name)
        self.progress.say(f'  done in {seconds:.0f}s')
        return StageResult(name, h, final, outputs, seconds, ran=True)


def _outputs_present(stage_dir: Path, outputs: Mapping[str, Any]) -> bool:
    """A finished stage's checkpoint is still there (a user may have deleted it)."""
    ckpt = outputs.get('checkpoint')
    return ckpt is None or (stage_dir / ckpt).is_file()  # an absolute path joins as itself


def _swap_into_place(work: Path, final: Path) -> None:
    old = final.parent / f'.{final.name}.old-{os.getpid()}'
    if final.exists():
        os.replace(final, old)
    os.replace(work, final)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- recipes


@dataclass(frozen=True)
class RunSpec:
    """One training run: a recipe, its variables and study-level settings; paths are kept apart from the hash."""
    kind: str                                  # pretrain | cpt | upcycle
    settings: dict[str, Any]                   # hashed: variables and top-level keys that change the result
    paths: dict[str, Any] = field(default_factory=dict)   # not hashed: where things are
    display: dict[str, Any] = field(default_factory=dict)  # not hashed: console output only


def build_recipe(cfg: StudyConfig, spec: RunSpec, placeholders: bool = False) -> dict[str, Any]:
    """The resolved foundry config of a run (with `<name>` placeholders for paths when hashing)."""
    from omegaconf import OmegaConf as om
    from omegaconf.errors import OmegaConfBaseException
    path = cfg.recipe_path(spec.kind)
    try:
        base = om.load(path)
        variables = dict(spec.settings.get('variables', {}))
        paths = dict(spec.paths.get('variables', {}))
        variables.update({k: f'<{k}>' for k in paths} if placeholders else paths)
        have = set((om.to_container(base, resolve=False) or {}).get('variables') or {})
        missing = sorted(set(variables) - have)
        if missing:
            raise ValueError(f'recipes.{spec.kind}: {path} has no variables {missing}; the study sets them')
        layers = [{'variables': variables}, spec.settings.get('top', {}), {} if placeholders else spec.display]
        if cfg.model:
            layers.append({'model': dict(cfg.model)})
        if spec.kind == 'upcycle' and cfg.upcycle:
            layers.append({'upcycle': dict(cfg.upcycle)})
        merged = om.merge(base, *[om.create(layer) for layer in layers if layer])
        if cfg.train_overrides:
            merged = om.merge(merged, om.from_dotlist(list(cfg.train_overrides)))
        out = om.to_container(merged, resolve=True)
    except OmegaConfBaseException as e:
        raise ValueError(f'recipes.{spec.kind}: {path}: {e}') from None
    if spec.kind == 'upcycle' and 'upcycle' not in out:
        raise ValueError(f'recipes.upcycle: {path} has no `upcycle:` block')
    if spec.kind != 'upcycle' and 'upcycle' in out:
        raise ValueError(f'recipes.{spec.kind}: {path} has an `upcycle:` block; only the upcycling recipe may')
    return out


def moe_model_config(dense_model: Mapping[str, Any], upcycle_block: Mapping[str, Any]) -> dict[str, Any]:
    """The MoE model block the upcycle block turns `dense_model` into (for FLOPs and validation; torch backend)."""
    from foundry_upcycle.config import UpcycleConfig, moe_ffn_config
    model = copy.deepcopy(dict(dense_model))
    model['ffn_config'] = moe_ffn_config(model, UpcycleConfig.from_mapping(upcycle_block), 'torch')
    return model


def shipped_models(scale: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(dense, upcycled) model blocks of the shipped CPT / upcycling recipes of a scale (yamls/<scale>)."""
    from omegaconf import OmegaConf as om
    from foundry_upcycle.study.config import REPO
    blocks = {}
    for kind in ('cpt', 'upcycle'):
        raw = om.load(REPO / 'yamls' / scale / f'{kind}.yaml')
        required = {k: f'<{k}>' for k, v in om.to_container(raw.variables, resolve=False).items() if v == '???'}
        blocks[kind] = om.to_container(om.merge(raw, {'variables': required}), resolve=True)
    dense = blocks['cpt']['model']
    block = {k: v for k, v in blocks['upcycle']['upcycle'].items() if k != 'from'}
    return dense, moe_model_config(blocks['upcycle']['model'], block)


# ----------------------------------------------------------------------------------------------- training


def _visible_gpus() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def train_run(run_cfg: dict[str, Any], work: Path, nproc: int, progress: bool) -> None:
    """foundry's `train` on a resolved config: in-process for one process, else Composer's launcher."""
    (work / 'train.yaml').write_text(_dump_yaml(run_cfg))
    if nproc == 1:
        from omegaconf import OmegaConf as om
        from llmfoundry.command_utils import train
        trainer = train(om.create(copy.deepcopy(run_cfg)))
        trainer.close()
        del trainer
        gc.collect()
        return
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, 'PATH': f'{bin_dir}{os.pathsep}{os.environ.get("PATH", "")}', 'PYTHONUNBUFFERED': '1'}
    cmd = [sys.executable, '-m', 'composer.cli.launcher', '-n', str(nproc), '-c', 'llmfoundry', 'train',
           str(work / 'train.yaml')]
    log.info('launching %s', ' '.join(cmd))
    rc = subprocess.run(cmd, env=env, stdout=None if progress else subprocess.DEVNULL).returncode
    if rc != 0:
        raise RuntimeError(f'`{" ".join(cmd)}` failed with exit code {rc}')


def _dump_yaml(cfg: Mapping[str, Any]) -> str:
    from omegaconf import OmegaConf as om
    return om.to_yaml(om.create(dict(cfg)))


def final_checkpoint(save_folder: Path, steps: int) -> Path:
    found = sorted(save_folder.glob(f'*-ba{steps}-rank0.pt'))
    if not found:
        have = sorted(p.name for p in save_folder.iterdir()) if save_folder.is_dir() else []
        raise RuntimeError(f'training ended without a checkpoint at batch {steps} in {save_folder} (found {have}); '
                           'see the training log above')
    return found[-1]


def run_metrics(jsonl: Path, tokens_per_step: int) -> dict[str, Any]:
    """Loss curve, training CE over the last 50 steps and measured throughput from the jsonl logger's file."""
    from foundry_upcycle.loggers import read_jsonl
    metrics = {k: sorted(dict(v).items()) for k, v in read_jsonl(str(jsonl)).items()}  # a resumed run logs twice
    key = next((k for k in TRAIN_CE_KEYS if metrics.get(k)), None)
    curve = [[int(b) + 1, float(v)] for b, v in metrics.get(key, [])] if key else []
    window = min(CE_WINDOW, len(curve))
    train_seconds = 3600.0 * metrics['time/train'][-1][1] if metrics.get('time/train') else None
    rates = [v for _, v in metrics.get(THROUGHPUT_KEY, []) if v > 0]
    clock = [v for _, v in metrics.get('time/train', [])]
    step_times = [3600.0 * (b - a) for a, b in zip(clock, clock[1:]) if b > a]  # the first step (set-up) is left out
    if rates:
        tokens_per_s = statistics.median(rates)
    elif step_times:   # runs shorter than the speed monitor's window
        tokens_per_s = tokens_per_step / statistics.median(step_times)
    else:
        tokens_per_s = None
    out = {
        'train_ce_last50': sum(v for _, v in curve[-window:]) / window if window else None,
        'train_ce_window': window,
        'train_ce_metric': key,
        'tokens_per_s': tokens_per_s,
        'step_time_s': tokens_per_step / tokens_per_s if tokens_per_s else None,
        'train_seconds': train_seconds,
        'loss_curve': curve,
    }
    if metrics.get('loss/train/lbl'):
        lbl = [v for _, v in metrics['loss/train/lbl']][-CE_WINDOW:]
        out['lbl_last50'] = sum(lbl) / len(lbl)
    return out


# ----------------------------------------------------------------------------------------------- the study


@dataclass
class StudyPlan:
    """What is known before any training: resolved recipes' shapes, FLOPs per token, steps per arm."""
    seq_len: int
    tokens_per_step: int
    pretrain_tokens: int
    dense_model: dict[str, Any]
    moe_model: dict[str, Any]
    upcycle_block: dict[str, Any]
    flops: dict[str, float]
    params: dict[str, tuple[int, int]]
    token_ratio: float
    steps: dict[tuple[str, float], int]
    target_tokens: dict[tuple[str, float], int]


def _warmup(steps: int, fraction: float) -> str:
    return f'{max(1, round(fraction * steps)) if fraction > 0 else 0}ba'


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
        self.plan: Optional[StudyPlan] = None
        self._session = None

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

    def _seq_len(self) -> int:
        return self.cfg.max_seq_len or (self.cfg.data.max_seq_len if self.cfg.scale == 'tiny' else None)

    def _spec(self, kind: str, steps: int, name: str, dense_checkpoint: Optional[str] = None) -> RunSpec:
        cfg, tiny = self.cfg, self.cfg.scale == 'tiny'
        dp = self._data_paths() if (self.data is not None or not tiny) else {}
        variables: dict[str, Any] = {'run_name': name, 'seed': cfg.seed, 'max_duration': f'{steps}ba'}
        top: dict[str, Any] = {'eval_first': False, 'eval_interval': f'{steps}ba', 'eval_subset_num_batches': 8}
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
        lr = cfg.pretrain_lr if kind == 'pretrain' else cfg.lr
        if lr:
            variables['lr'] = lr
        if kind != 'pretrain':
            variables['warmup'] = _warmup(steps, cfg.warmup_fraction)
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
        return RunSpec(kind, {'variables': variables, 'top': top}, {'variables': paths}, display)

    def _resolve(self, spec: RunSpec, work: Optional[Path] = None, placeholders: bool = False) -> dict[str, Any]:
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
        if cfg.pretrains:
            pre = self._resolve(self._spec('pretrain', cfg.pretrain_steps, 'plan'), placeholders=True)
            if int(pre['max_seq_len']) != seq or pre['model'] != dense_model:
                raise ValueError('recipes.pretrain and recipes.cpt must train the same model at the same max_seq_len '
                                 '(CPT continues the pretrained checkpoint)')
            pretrain_tokens = cfg.pretrain_steps * int(pre['global_train_batch_size']) * seq
        else:
            pretrain_tokens = cfg.pretrain_tokens
        flops = {'cpt': train_flops_per_token(dense_model, seq), 'upcycle': train_flops_per_token(moe_model, seq)}
        steps, targets = {}, {}
        for b in cfg.budgets:
            tok = dict(zip(ARMS, matched_tokens(dense_model, moe_model, b, pretrain_tokens, seq)))
            for arm in ARMS:
                targets[(arm, b)] = tok[arm]
                steps[(arm, b)] = max(1, round(tok[arm] / tokens_per_step))
        return StudyPlan(seq, tokens_per_step, pretrain_tokens, dense_model, moe_model, block, flops,
                         {'cpt': param_counts(dense_model), 'upcycle': param_counts(moe_model)},
                         flops['cpt'] / flops['upcycle'], steps, targets)

    # -------------------------------------------------------------- stages

    def stage_data(self) -> None:
        cfg = self.cfg
        if cfg.scale == 'tiny':
            from foundry_upcycle.study.data import prepare_data
            data_cfg = cfg.data
            self.progress.stage('data: built-in corpora (or your text folders) -> tokenizer + MDS')
            t0 = time.monotonic()
            self.data = prepare_data(data_cfg, self.out / 'data', progress=cfg.progress)
            self.data_hash = self.data.config_hash
            self.data_seconds = round(time.monotonic() - t0, 2)
            return
        self.progress.stage(f'data: your MDS data in {cfg.mds_dir}')
        self.data = None
        self.data_seconds = 0.0
        fp = {}
        for root in (cfg.mds_dir, cfg.generic_mds_dir):
            for split in (('train', 'val') if root else ()):
                index = Path(root) / split / 'index.json'
                if index.is_file():
                    fp[str(index)] = hashlib.sha256(index.read_bytes()).hexdigest()
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
        spec = self._spec('pretrain', cfg.pretrain_steps, 'dense')
        hashed = self._resolve(spec, placeholders=True)
        warm = (hashed.get('scheduler') or {}).get('t_warmup')
        if isinstance(warm, str) and warm.endswith('ba') and int(warm[:-2]) >= cfg.pretrain_steps:
            log.warning('pretraining: the recipe\'s warmup %s is not shorter than the run (%d steps); using %s',
                        warm, cfg.pretrain_steps, _warmup(cfg.pretrain_steps, cfg.warmup_fraction))
            spec.settings['top']['scheduler'] = {'t_warmup': _warmup(cfg.pretrain_steps, cfg.warmup_fraction)}
            hashed = self._resolve(spec, placeholders=True)
        steps = cfg.pretrain_steps

        def fn(work: Path) -> dict[str, Any]:
            run = self._resolve(spec, work)
            train_run(run, work, self.nproc, cfg.progress)
            ckpt = final_checkpoint(work / 'checkpoints', steps)
            return {'checkpoint': str(ckpt.relative_to(work)), 'model': run['model'], 'steps': steps,
                    'tokens': plan.pretrain_tokens,
                    **run_metrics(work / 'metrics.jsonl', steps and plan.pretrain_tokens // steps)}
        return self.stages.run('dense', {'recipe': hashed, 'data': self.data_hash}, fn,
                               what=f'dense pretraining: {steps} steps, {plan.pretrain_tokens:,} tokens',
                               resumable=True)

    @staticmethod
    def _checkpoint(stage: StageResult) -> str:
        ckpt = Path(stage.outputs['checkpoint'])
        return str(ckpt if ckpt.is_absolute() else stage.dir / ckpt)

    def stage_arm(self, arm: str, budget: float, dense: StageResult) -> StageResult:
        plan, cfg = self.plan, self.cfg
        steps = plan.steps[(arm, budget)]
        name = f'{arm}-b{budget:g}'
        spec = self._spec(arm, steps, name, self._checkpoint(dense))
        hashed = self._resolve(spec, placeholders=True)

        def fn(work: Path) -> dict[str, Any]:
            from foundry_upcycle.transforms import apply_upcycle_block
            run = self._resolve(spec, work)
            train_run(run, work, self.nproc, cfg.progress)
            ckpt = final_checkpoint(work / 'checkpoints', steps)
            model = apply_upcycle_block(run)['model'] if arm == 'upcycle' else run['model']
            return {'checkpoint': str(ckpt.relative_to(work)), 'model': model, 'steps': steps,
                    'tokens': steps * plan.tokens_per_step, **run_metrics(work / 'metrics.jsonl', plan.tokens_per_step)}
        label = 'CPT' if arm == 'cpt' else 'upcycling'
        return self.stages.run(f'arms/{name}', {'recipe': hashed, 'data': self.data_hash, 'dense': dense.hash}, fn,
                               what=f'{label} @ budget {budget:g}: {steps} steps, '
                                    f'{steps * plan.tokens_per_step:,} tokens',
                               resumable=True)

    def _eval_session(self):
        if self._session is None:
            from foundry_upcycle.study.evaluate import EvalSession
            dp = self._data_paths()
            self._session = EvalSession(dp['tokenizer'], dp['val'], self._gauntlet_spec(), self.plan.seq_len,
                                        self.cfg.eval.batch_size, self.out / '.eval-work', self.cfg.progress)
        return self._session

    def _gauntlet_spec(self):
        from foundry_upcycle.study.gauntlet import GauntletSpec
        local = self.cfg.eval.resolved_local_data()
        if local is None:
            return None
        e = self.cfg.eval
        return GauntletSpec(local_data=local, tasks=e.tasks, max_examples_per_task=e.max_examples_per_task,
                            seed=e.seed)

    def stage_eval(self, name: str, model_stage: StageResult) -> StageResult:
        e = self.cfg.eval
        inputs = {'model': model_stage.hash, 'data': self.data_hash, 'local_data': e.resolved_local_data(),
                  'tasks': e.tasks, 'max_examples_per_task': e.max_examples_per_task, 'batch_size': e.batch_size,
                  'seed': e.seed, 'seq_len': self.plan.seq_len}

        def fn(work: Path) -> dict[str, Any]:
            session = self._eval_session()
            res = session.evaluate(self._checkpoint(model_stage), model_stage.outputs['model'])
            res['eval_seconds'] = session.last_seconds
            res['eval_seconds_by_task'] = session.last_seconds_by_task
            (work / 'eval.json').write_text(json.dumps(res, indent=1, sort_keys=True) + '\n')
            return res
        return self.stages.run(f'eval/{name}', inputs, fn, what=f'evaluate {name}')

    def stage_inference(self, cpt: StageResult, up: StageResult) -> StageResult:
        inf = self.cfg.inference
        inputs = {'cpt': cpt.hash, 'upcycle': up.hash, 'settings': dataclasses.asdict(inf), 'threads': self.cfg.threads,
                  'tokenizer': self.data_hash}

        def fn(work: Path) -> dict[str, Any]:
            return export_and_benchmark(self, cpt, up, work)
        return self.stages.run('inference', inputs, fn, what='export to Hugging Face + inference benchmark')

    # -------------------------------------------------------------- results and report

    def results(self, dense: StageResult, dense_eval: StageResult, arms: dict, evals: dict) -> dict[str, Any]:
        plan, cfg = self.plan, self.cfg
        config = cfg.to_mapping()
        config['upcycle'] = plan.upcycle_block          # the effective block (recipe + overrides)
        config['upcycle_overrides'] = dict(cfg.upcycle)
        config['eval']['local_data_resolved'] = cfg.eval.resolved_local_data()
        dense_eval_out = _eval_entry(dense_eval.outputs)
        entries = []
        for b in cfg.budgets:
            for arm in ARMS:
                st = arms[(arm, b)]
                o = st.outputs
                total, active = plan.params[arm]
                entries.append({
                    'arm': arm, 'budget': b, 'tokens': o['tokens'], 'target_tokens': plan.target_tokens[(arm, b)],
                    'steps': o['steps'], 'warmup': _warmup(o['steps'], cfg.warmup_fraction),
                    'train_flops': o['tokens'] * plan.flops[arm], 'flops_per_token': plan.flops[arm],
                    'total_params': total, 'active_params': active,
                    'train_ce_last50': o['train_ce_last50'], 'train_ce_window': o['train_ce_window'],
                    **({'lbl_last50': o['lbl_last50']} if 'lbl_last50' in o else {}),
                    'tokens_per_s': o['tokens_per_s'], 'step_time_s': o['step_time_s'],
                    'train_seconds': o['train_seconds'],
                    'eval': _eval_entry(evals[(arm, b)].outputs), 'loss_curve': o['loss_curve'],
                })
        missing, not_selected = self._task_coverage(dense_eval.outputs)
        dense_total, _ = plan.params['cpt']
        wall = {s.name: s.seconds for s in self._all_stage_results}
        wall['data'] = getattr(self, 'data_seconds', 0.0)
        return {
            'schema': 1,
            'config': config,
            'budgets': list(cfg.budgets),
            'token_ratio': plan.token_ratio,
            'missing_eval_tasks': missing,
            'not_selected_eval_tasks': not_selected,
            'dense': {
                'params': dense_total, 'flops_per_token': plan.flops['cpt'], 'pretrain_tokens': plan.pretrain_tokens,
                'pretrain_flops': plan.pretrain_tokens * plan.flops['cpt'], 'pretrain_steps': dense.outputs['steps'],
                'train_ce_last50': dense.outputs.get('train_ce_last50'), 'eval': dense_eval_out,
            },
            'arms': entries,
            'wall_clock': {'stages_s': wall},
            'wall_clock_fields': list(WALL_CLOCK_FIELDS),
        }

    def _task_coverage(self, dense_eval: Mapping[str, Any]) -> tuple[list[str], list[str]]:
        from foundry_upcycle.study.gauntlet import BENCHMARKS
        if self.cfg.eval.resolved_local_data() is None:
            return list(BENCHMARKS), []
        return list(dense_eval.get('missing_tasks') or []), list(dense_eval.get('not_selected_tasks') or [])

    # -------------------------------------------------------------- run

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        check_paths(cfg)
        from foundry_upcycle.study.evaluate import set_offline_env
        set_offline_env()
        if cfg.scale == 'tiny' and cfg.eval.resolved_local_data() is None:
            log.warning('eval: no ICL data (eval.local_data %s); cross-entropy only, no core average',
                        cfg.eval.local_data)
        threads = None
        if cfg.threads:
            import torch
            threads = torch.get_num_threads()
            torch.set_num_threads(cfg.threads)
        try:
            return self._run()
        finally:
            if threads:
                import torch
                torch.set_num_threads(threads)

    def _run(self) -> dict[str, Any]:
        cfg = self.cfg
        n_budgets = len(cfg.budgets)
        self.progress.total = (1 + 1 + 2 * n_budgets + 2 * n_budgets + 1 + 1 + (0 if cfg.inference.skip else 2) + 1)
        self.plan = self.make_plan()  # fails on bad recipes / overrides before the data is built
        self.stage_data()
        if self.nproc is None:
            self.nproc = max(1, _visible_gpus()) if cfg.scale != 'tiny' else 1
        self.plan = self.make_plan()
        p = self.plan
        self.progress.say(
            f'plan: dense {p.params["cpt"][0]:,} params, upcycled {p.params["upcycle"][0]:,} total / '
            f'{p.params["upcycle"][1]:,} active; training FLOPs per token {p.flops["cpt"]:.3g} (dense) vs '
            f'{p.flops["upcycle"]:.3g} (upcycled): upcycled/CPT token ratio at matched FLOPs {p.token_ratio:.3f}')
        for b in cfg.budgets:
            self.progress.say(f'  budget {b:g}: CPT {p.steps[("cpt", b)]} steps, upcycling '
                              f'{p.steps[("upcycle", b)]} steps ({p.tokens_per_step:,} tokens per step)')
        dense = self.stage_dense()
        arms = {(arm, b): self.stage_arm(arm, b, dense) for b in cfg.budgets for arm in ARMS}
        dense_eval = self.stage_eval('dense', dense)
        evals = {(arm, b): self.stage_eval(f'{arm}-b{b:g}', arms[(arm, b)]) for b in cfg.budgets for arm in ARMS}
        self._all_stage_results = [dense, *arms.values(), dense_eval, *evals.values()]
        results = self.results(dense, dense_eval, arms, evals)
        inference = None
        if not cfg.inference.skip:
            top = max(cfg.budgets)
            inference = self.stage_inference(arms[('cpt', top)], arms[('upcycle', top)])
            results['wall_clock']['stages_s']['inference'] = inference.seconds
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

    def _summary(self, results: Mapping[str, Any], report: Path) -> None:
        from foundry_upcycle.study.report import ce_winner
        self.progress.say(f'upcycled/CPT token ratio at matched FLOPs: {results["token_ratio"]:.3f}')
        for b in results['budgets']:
            _, text = ce_winner(results, b)
            self.progress.say(f'  held-out domain CE at budget {b:g}: {text.replace("**", "")}')
        self.progress.say(f'ran {len(self.stages.ran)} stage(s), skipped {len(self.stages.skipped)}; '
                          f'total {self.progress.elapsed():.0f}s; report: {report}')


def _eval_entry(res: Mapping[str, Any]) -> dict[str, Any]:
    keys = ('ce_generic', 'ce_domain', 'core_average', 'core_average_foundry', 'tasks', 'icl_examples',
            'categories_without_tasks', 'categories_dropped_by_foundry')
    return {k: res.get(k) for k in keys if k in res}


def write_json(path: Path, obj: Any) -> None:
    from foundry_upcycle.bench.outputs import jsonable
    text = json.dumps(jsonable(obj), indent=1, allow_nan=False) + '\n'
    atomic_write(str(path), lambda tmp: Path(tmp).write_text(text))


# ----------------------------------------------------------------------------------------------- inference


def export_and_benchmark(study: Study, cpt: StageResult, up: StageResult, work: Path) -> dict[str, Any]:
    """The largest-budget CPT model (dense) and upcycled model as Hugging Face folders, benchmarked together."""
    import torch
    from foundry_upcycle.bench.inference import CPU_WORKLOAD, PAPER_WORKLOAD, BenchConfig, Workload, benchmark
    from foundry_upcycle.checkpoint_io import load_state_dict
    from foundry_upcycle.export.hf_export import export_state_dict
    inf, tokenizer = study.cfg.inference, study._data_paths()['tokenizer']
    paths = {}
    for name, stage in (('dense', cpt), ('moe', up)):
        sd = load_state_dict(study._checkpoint(stage), f'{stage.name} checkpoint')
        paths[name] = export_state_dict(sd, stage.outputs['model'], work / 'hf' / name, tokenizer=tokenizer,
                                        progress=False)
        del sd
    top_k = int(study.plan.upcycle_block.get('top_k', 2))
    top_ks = inf.top_ks or tuple(sorted({1, top_k}))
    gpu = torch.cuda.is_available()
    default_in, default_out = PAPER_WORKLOAD if gpu else CPU_WORKLOAD
    if default_in + default_out > study.plan.seq_len:     # the exported models hold max_seq_len positions
        default_in, default_out = study.plan.seq_len // 2, study.plan.seq_len // 4
    workload = Workload(input_tokens=inf.input_tokens or default_in, output_tokens=inf.output_tokens or default_out,
                        num_requests=inf.num_requests or (64 if gpu else 8),
                        batch_sizes=inf.batch_sizes or ((1, 4, 16, 64) if gpu else (1, 4)), rates=(),
                        seed=study.cfg.seed)
    bench_cfg = BenchConfig(workload=workload, dense_path=str(paths['dense']), moe_path=str(paths['moe']),
                            top_ks=top_ks, threads=study.cfg.threads, progress=study.cfg.progress)
    result = benchmark(bench_cfg, str(work))
    files = {k: Path(v).name for k, v in result['files'].items()}
    return {'inference_json': files['inference.json'], 'figure': files['latency_vs_throughput.png'],
            'hf': {k: str(Path(v).relative_to(work)) for k, v in paths.items()},
            'summary': result.get('summary')}


# ----------------------------------------------------------------------------------------------- notes


def study_notes(results: Mapping[str, Any], study: Study) -> str:
    """A report section on how the numbers were made: steps, CE windows, warmups, data, timings."""
    cfg, plan = study.cfg, study.plan
    lines = ['## How this study ran']
    lines.append(f'Scale `{cfg.scale}`, seed {cfg.seed}; recipes ' + ', '.join(
        f'`{cfg.recipe_path(k)}`' for k in ((('pretrain',) if cfg.pretrains else ()) + ARMS)) + '; training '
        f'sequence length {plan.seq_len}, {plan.tokens_per_step:,} tokens per step in every run.')
    if study.data is not None:
        toks = study.data.tokens
        lines.append(f'Data: {toks["generic/train"]:,} generic and {toks["domain/train"]:,} domain training tokens; '
                     f'held-out validation {toks["generic/val"]:,} generic and {toks["domain/val"]:,} domain tokens '
                     f'(`{study.data.root}`).')
    lines.append(f'Each arm\'s steps are its FLOP-matched token budget ({plan.flops["cpt"]:.3g} training FLOPs per '
                 f'token dense, {plan.flops["upcycle"]:.3g} upcycled, i.e. 6 x active non-embedding + LM-head '
                 'parameters + attention) rounded to whole steps; each run has a fresh linear warmup over '
                 f'{100 * cfg.warmup_fraction:g}% of its steps, then cosine decay.')
    short = [f'{a["arm"]} @ {a["budget"]:g} ({a["train_ce_window"]} steps)' for a in results['arms']
             if a['train_ce_window'] < CE_WINDOW]
    if short:
        lines.append(f'Training CE is the mean over the last {CE_WINDOW} steps (the paper\'s metric), except for '
                     f'runs shorter than that, which average all their steps: {", ".join(short)}.')
    lines.append(f'Throughput is the median of foundry\'s speed monitor ({THROUGHPUT_KEY}) over each run; '
                 'it and the step times are wall-clock measurements on this machine, the only fields of '
                 'results.json that change between identical runs (`' + '`, `'.join(WALL_CLOCK_FIELDS) + '`).')
    tasks = sorted({t for a in [results['dense'], *results['arms']] for t in ((a.get('eval') or {}).get('tasks')
                                                                                 or {})})
    if tasks:
        examples = (results['dense'].get('eval') or {}).get('icl_examples') or {}
        lines.append('ICL tasks evaluated (examples each): ' + ', '.join(f'{t} ({examples.get(t, "?")})'
                                                                          for t in tasks) + '. ' +
                     (f'Present but not selected: {", ".join(results["not_selected_eval_tasks"])}. '
                      if results.get('not_selected_eval_tasks') else '') +
                     'The core average here is over the categories with at least one evaluated task.')
    else:
        lines.append('No ICL tasks were evaluated (no eval data); there is no core average.')
    wall = results['wall_clock']['stages_s']
    lines.append('Stage times (s): ' + ', '.join(f'{k} {v:.0f}' for k, v in wall.items()) + '.')
    return '\n\n'.join(lines) + '\n'


def run_study(cfg: StudyConfig) -> dict[str, Any]:
    """Runs (or resumes) the study; returns the results dict, which is also written to `<out>/results.json`."""
    return Study(cfg).run()
