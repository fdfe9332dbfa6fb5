"""Runs foundry's train() for several parallelism modes in one `composer -n N` launch (imports once, a launch
costs more than a tiny run) and writes, per mode, what tests/test_distributed.py compares: step-0 eval CE,
per-step losses and LBL, the `upcycle_router_monitor` values, the full parameters after training (rank 0), and
any error. A mode with `"kill_after_first_save": true` SIGKILLs its whole launch (launcher and ranks) once every
rank has written its first checkpoint, before the next batch: a crash at a known point.

Usage: composer -n 2 tests/distributed_worker.py SPEC.json   (SPEC: {"out": dir, "base": cfg, "modes": {name: overrides}})
"""
from __future__ import annotations

import copy
import json
import os
import signal
import sys
import traceback
from pathlib import Path

import torch
from composer.core import Callback, State
from composer.loggers import Logger

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _merge(cfg: dict, overrides: dict) -> dict:
    cfg = copy.deepcopy(cfg)
    for key, value in overrides.items():
        *path, leaf = key.split('.')
        node = cfg
        for part in path:
            node = node.setdefault(part, {})
        if value is None and leaf in node:
            del node[leaf]
        else:
            node[leaf] = value
    return cfg


OPENED: list[str] = []  # dense files this process opened through the one reader (see _record_reads)


def _record_reads() -> None:
    """Every read of a weights file goes through `reader.open_source`: record the calls of this process."""
    from foundry_upcycle import reader
    if getattr(reader.open_source, 'recorded', False):
        return
    real = reader.open_source

    def open_source(path, *args, **kwargs):
        OPENED.append(str(path))
        return real(path, *args, **kwargs)
    open_source.recorded = True
    reader.open_source = open_source


class KillAfterFirstSave(Callback):
    """At the start of the first batch after a checkpoint was saved: barrier (every rank's shard is on disk), then
    rank 0 writes the saved batch to `killed_at.json` and SIGKILLs its process group (the launcher and all ranks)."""
    NAME = 'test_kill_after_first_save'

    def __init__(self, marker: str):
        self.marker = Path(marker)

    def batch_start(self, state: State, logger: Logger) -> None:
        from composer.callbacks import CheckpointSaver
        from composer.utils import dist
        saver = next(cb for cb in state.callbacks if isinstance(cb, CheckpointSaver))
        saved = saver.all_saved_checkpoints_to_timestamp  # the same on every rank (saver.saved_checkpoints is not)
        if not saved:
            return
        dist.barrier()
        if dist.get_global_rank() == 0:
            self.marker.write_text(json.dumps({'batch': int(state.timestamp.batch), 'saved': sorted(saved)}))
            os.killpg(os.getpgrp(), signal.SIGKILL)
        dist.barrier()  # the other ranks wait here for the kill


def _register_killer() -> None:
    from llmfoundry.registry import callbacks
    if KillAfterFirstSave.NAME not in callbacks.get_all():
        callbacks.register(KillAfterFirstSave.NAME, func=KillAfterFirstSave)


def router_metrics(trainer) -> dict:
    """Every `router/...` metric the monitor logged: {key: [(batch, value), ...]}."""
    from composer.loggers import InMemoryLogger

    from conftest import logged
    mem = next(d for d in trainer.logger.destinations if isinstance(d, InMemoryLogger))
    return {k: logged(trainer, k) for k in sorted(mem.data) if k.startswith('router/')}


def run_mode(name: str, cfg: dict, out: Path, env: dict) -> dict:
    from composer.utils import dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from conftest import logged, run_train
    from foundry_upcycle.study.streaming_memory import release, trainer_datasets
    _record_reads()
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    OPENED.clear()
    try:
        trainer = run_train(cfg)
        result = {
            'ce0': {k: logged(trainer, f'metrics/eval/{k}/LanguageCrossEntropy') for k in ('domain', 'generic')},
            'loss': logged(trainer, 'loss/train/loss'),
            'lbl': logged(trainer, 'loss/train/lbl'),
            'zloss': logged(trainer, 'loss/train/router_zloss'),
            'total': logged(trainer, 'loss/train/total'),
            'fsdp': trainer.state.fsdp_enabled,
            'batch': int(trainer.state.timestamp.batch),
            'router_lbl': logged(trainer, 'router/lbl'),
            'ffn_types': sorted({f'{type(m).__module__}.{type(m).__name__}'
                                 for n, m in trainer.state.model.named_modules() if n.endswith('.ffn')}),
            'router': router_metrics(trainer),
        }
        monitor = next((c for c in trainer.state.callbacks if type(c).__name__ == 'RouterMonitor'), None)
        # tokens the monitor counted on this rank in the last batch (before its all-reduce), per layer
        result['router_tokens'] = {i: float(sums[-1]) for i, sums in monitor._sums.items()} if monitor else None
        loader = next((c for c in trainer.state.callbacks if type(c).__name__ == 'UpcycleLoader'), None)
        result['loader'] = getattr(loader, 'report', None)
        result['opened_by_rank'] = dist.all_gather_object(len(OPENED)) if dist.get_world_size() > 1 else [len(OPENED)]
        params = get_model_state_dict(trainer.state.model,
                                      options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if dist.get_global_rank() == 0:
            torch.save({k: v.clone() for k, v in params.items()}, out / f'{name}.params.pt')
        release(trainer_datasets(trainer))      # one process trains every mode: streaming would keep each one's fds
        trainer.close()
    except Exception as e:  # recorded for the test; the other rank usually fails the same way
        result = {'error': f'{type(e).__name__}: {e}', 'traceback': traceback.format_exc()[-4000:]}
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return result


def main(spec_path: str) -> None:
    from composer.utils import dist
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec['out'])
    results = {}
    for name, mode in spec['modes'].items():
        cfg = _merge(spec['base'], mode.get('overrides', {}))
        cfg['variables']['run_name'] = mode.get('run_name', name)
        cfg['variables']['save_folder'] = str(out / mode.get('run_name', name) / 'checkpoints')
        if mode.get('kill_after_first_save'):
            _register_killer()
            cfg.setdefault('callbacks', {})[KillAfterFirstSave.NAME] = {'marker': str(out / 'killed_at.json')}
        results[name] = run_mode(name, cfg, out, mode.get('env', {}))
        if dist.get_global_rank() == 0:
            (out / 'results.json').write_text(json.dumps(results, indent=1))
        print(f'distributed_worker: {name}: {results[name].get("error", "ok")}', flush=True)


if __name__ == '__main__':
    main(sys.argv[1])
