"""Training stage helpers: foundry's own `train` on a resolved config, the final checkpoint, and what a run's
jsonl log says (loss curve, final training CE, throughput)."""
from __future__ import annotations

import copy
import gc
import logging
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)

TRAIN_CE_KEYS = ('metrics/train/LanguageCrossEntropy', 'loss/train/loss', 'loss/train/total')
THROUGHPUT_KEY = 'throughput/tokens_per_sec'
# Final training CE: the mean over the last 5% of a run's steps, at least 10 (all steps of a shorter run). The
# paper's "last 50 steps" is at most ~6% of its runs; a fixed 50 would cover most of a short CPU run, warm-up included.
TAIL_FRACTION = 0.05
MIN_TAIL_STEPS = 10


def tail_window(steps: int) -> int:
    return min(steps, max(MIN_TAIL_STEPS, math.ceil(TAIL_FRACTION * steps)))


def visible_gpus() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def train_run(run_cfg: dict[str, Any], work: Path, nproc: int, progress: bool) -> None:
    """foundry's `train` on a resolved config: in-process for one process, else Composer's launcher."""
    (work / 'train.yaml').write_text(dump_yaml(run_cfg))
    if nproc == 1:
        from omegaconf import OmegaConf as om
        from llmfoundry.command_utils import train
        from foundry_upcycle.study.streaming_memory import release, trainer_datasets
        trainer = train(om.create(copy.deepcopy(run_cfg)))
        release(trainer_datasets(trainer))      # a worker trains many runs: streaming would keep each run's fds
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


def dump_yaml(cfg: Mapping[str, Any]) -> str:
    from omegaconf import OmegaConf as om
    return om.to_yaml(om.create(dict(cfg)))


def final_checkpoint(save_folder: Path, steps: int) -> Path:
    found = sorted(save_folder.glob(f'*-ba{steps}-rank0.pt'))
    if not found:
        have = sorted(p.name for p in save_folder.iterdir()) if save_folder.is_dir() else []
        raise RuntimeError(f'training ended without a checkpoint at batch {steps} in {save_folder} (found {have}); '
                           'see the training log above')
    return found[-1]


def _mean_tail(values: list[float], window: int) -> float | None:
    return sum(values[-window:]) / window if window and values else None


def run_metrics(jsonl: Path, tokens_per_step: int) -> dict[str, Any]:
    """Loss curve, final training CE (mean over the last 5% of steps), router curves and throughput from the jsonl
    logger's file. Only `tokens_per_s`, `step_time_s` and `train_seconds` are wall-clock measurements."""
    from foundry_upcycle.loggers import read_jsonl
    metrics = {k: sorted(dict(v).items()) for k, v in read_jsonl(str(jsonl)).items()}  # a resumed run logs twice
    key = next((k for k in TRAIN_CE_KEYS if metrics.get(k)), None)
    curve = [[int(b) + 1, float(v)] for b, v in metrics.get(key, [])] if key else []
    window = tail_window(len(curve))
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
        'train_ce_final': _mean_tail([v for _, v in curve], window),
        'train_ce_window': window,
        'train_ce_metric': key,
        'tokens_per_s': tokens_per_s,
        'step_time_s': tokens_per_step / tokens_per_s if tokens_per_s else None,
        'train_seconds': train_seconds,
        'loss_curve': curve,
    }
    if metrics.get('loss/train/lbl'):
        lbl = [v for _, v in metrics['loss/train/lbl']]
        out['lbl_final'] = _mean_tail(lbl, tail_window(len(lbl)))
    router = router_curves(metrics)
    if router:
        out['router'] = router
    return out


ROUTER_PREFIX = 'router/'


def router_curves(metrics: Mapping[str, list]) -> dict[str, list[list[float]]]:
    """`router/...` series logged by the `upcycle_router_monitor` callback: name -> [[step, value], ...]
    (steps 1-based), thinned to at most 200 points each so results.json stays small."""
    out = {}
    for name, series in sorted(metrics.items()):
        if not name.startswith(ROUTER_PREFIX) or not series:
            continue
        stride = max(1, math.ceil(len(series) / 200))
        pts = series[::stride]
        if pts[-1] != series[-1]:
            pts.append(series[-1])
        out[name[len(ROUTER_PREFIX):]] = [[int(b) + 1, float(v)] for b, v in pts]
    return out
