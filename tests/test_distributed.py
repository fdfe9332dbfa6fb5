"""Two-process upcycling on CPU (gloo) in every parallelism mode Composer 0.32 + torch 2.7 runs there.

Found by running them (README, "Distributed modes"): FSDP1 (FULL_SHARD, SHARD_GRAD_OP, NO_SHARD, and so its
activation checkpointing) calls `torch.cuda.current_device()` while wrapping, and `init_device: meta` materialises
on 'cuda' in Composer's `meta_init`: neither runs without a GPU. DDP and FSDP2 (`FSDP_VERSION=2`, DTensor), with
its sharded and full state dicts, `reshard_after_forward: false`, activation checkpointing and `init_device: mixed`,
do. All modes run in one `composer -n 2` launch (tests/distributed_worker.py) and are compared with one process
doing the same global batch in microbatches of one sequence. Every run carries the `upcycle_router_monitor`
(interval 1), whose values (summed over microbatches, all-reduced over ranks) must match the one-process run.
Each launch takes a free port (picked by the OS), so parallel sessions and other users of a port do not collide.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, SEQ, free_port, logged, run_train, tiny_recipe
from distributed_worker import run_mode
from foundry_upcycle.checkpoint_io import load_state_dict, save_safetensors
from foundry_upcycle.upcycle import expert_spread

pytestmark = pytest.mark.slow

FSDP2 = {'FSDP_VERSION': '2'}
RESUME = {'variables.max_duration': '4ba', 'variables.save_interval': '4ba', 'variables.eval_interval': '4ba'}
KILLED = {'variables.max_duration': '4ba', 'variables.save_interval': '2ba', 'variables.eval_interval': '4ba',
          'eval_first': False}


def _fsdp(**kw) -> dict:
    return {'fsdp_config': {'mixed_precision': 'FULL', **kw}}


MIXED = {**_fsdp(state_dict_type='full'), 'model.init_device': 'mixed'}  # full: Composer's delayed (rank-0) wrap
MODES = {
    'ddp': {},
    'fsdp2': {'overrides': _fsdp(), 'env': FSDP2},  # FSDP2's default state dict: sharded
    'fsdp2_full_state_dict': {'overrides': _fsdp(state_dict_type='full'), 'env': FSDP2},
    'fsdp2_no_reshard': {'overrides': _fsdp(reshard_after_forward=False), 'env': FSDP2},  # ~ SHARD_GRAD_OP
    'fsdp2_mixed': {'overrides': MIXED, 'env': FSDP2},
    'fsdp2_act_ckpt': {'overrides': _fsdp(activation_checkpointing=True), 'env': FSDP2},
    # Restarts of the runs above from their own checkpoints (autoresume), 2 more steps.
    'fsdp2_resume': {'run_name': 'fsdp2', 'overrides': {**_fsdp(), **RESUME}, 'env': FSDP2},
    'fsdp2_mixed_resume': {'run_name': 'fsdp2_mixed', 'overrides': {**MIXED, **RESUME}, 'env': FSDP2},
    # The restart of the run the `killed` launch SIGKILLed right after its first checkpoint (batch 2).
    'killed_resume': {'run_name': 'killed', 'overrides': {**_fsdp(), **KILLED}, 'env': FSDP2},
}
TRAINED = [m for m in MODES if not m.endswith('_resume')]


def _env() -> dict:
    path = f'{Path(sys.executable).parent}{os.pathsep}{os.environ.get("PATH", "")}'
    return {**os.environ, 'PATH': path, 'PYTHONUNBUFFERED': '1', 'HF_HUB_OFFLINE': '1', 'TRANSFORMERS_OFFLINE': '1'}


def _base(corpus, dense_checkpoint: Path, out: Path) -> dict:
    cfg = tiny_recipe('tiny/upcycle.yaml', corpus, out, dense_checkpoint=str(dense_checkpoint), max_duration='2ba',
                      eval_interval='2ba', save_interval='2ba', warmup='0ba')  # no warmup: step 0 trains the experts
    # Microbatches of one sequence: the LBL is nonlinear in the microbatch, and which sequences share a rank's
    # microbatch is the data loader's business; per-sequence microbatches make 1 and 2 processes comparable.
    cfg['device_train_microbatch_size'] = 1
    # The tokenizer's exact length, so the model is not resized (resizing fails on meta tensors).
    cfg['model']['vocab_size'] = load_state_dict(str(dense_checkpoint))['model.transformer.wte.weight'].shape[0]
    cfg['callbacks'] = {**(cfg.get('callbacks') or {}), 'upcycle_router_monitor': {'interval': 1}}
    return cfg


def _launch(spec: Path) -> list[str]:
    return [sys.executable, '-m', 'composer.cli.launcher', '-n', '2', '--master_port', str(free_port()),
            str(REPO / 'tests' / 'distributed_worker.py'), str(spec)]


@pytest.fixture(scope='module')
def single(corpus, dense_checkpoint, tmp_path_factory):
    """The one-process reference: (output dir, its results)."""
    out = tmp_path_factory.mktemp('dist')
    cfg = _base(corpus, dense_checkpoint, out)
    cfg['variables'].update(run_name='single', save_folder=str(out / 'single' / 'checkpoints'))
    return out, run_mode('single', cfg, out, {})


@pytest.fixture(scope='module')
def killed(single, corpus, dense_checkpoint):
    """A `composer -n 2` FSDP2 run (sharded checkpoints) that a callback SIGKILLs (launcher and ranks, no cleanup)
    right after its first checkpoint; `runs` restarts it (mode `killed_resume`): one launch fewer than a separate
    restart. Returns the killed launch and whether it wrote any results."""
    out = single[0]
    spec = out / 'killed_spec.json'
    mode = {'overrides': {**_fsdp(), **KILLED}, 'env': FSDP2, 'kill_after_first_save': True}
    spec.write_text(json.dumps({'out': str(out), 'base': _base(corpus, dense_checkpoint, out),
                                'modes': {'killed': mode}}))
    first = subprocess.run(_launch(spec), capture_output=True, text=True, env=_env(), cwd=out, timeout=900,
                           start_new_session=True)  # its own process group: the one the callback kills
    return first, (out / 'results.json').exists()


@pytest.fixture(scope='module')
def runs(single, killed, corpus, dense_checkpoint):
    out, results = single[0], {'single': single[1]}
    base = _base(corpus, dense_checkpoint, out)
    spec = out / 'spec.json'
    spec.write_text(json.dumps({'out': str(out), 'base': base, 'modes': MODES}))
    run = subprocess.run(_launch(spec), capture_output=True, text=True, env=_env(), cwd=out, timeout=1500)
    assert run.returncode == 0 and (out / 'results.json').exists(), run.stdout[-3000:] + run.stderr[-3000:]
    results.update(json.loads((out / 'results.json').read_text()))
    return out, results


def _params(out: Path, name: str) -> dict[str, torch.Tensor]:
    return torch.load(out / f'{name}.params.pt', weights_only=True)


@pytest.mark.parametrize('mode', TRAINED)   # incl. activation checkpointing (issue 8 defect 1, fixed)
def test_two_processes_match_one(runs, mode):
    """Step-0 eval CE (< 1e-5), per-step language loss and LBL, and every parameter after 2 optimizer steps."""
    out, results = runs
    one, two = results['single'], results[mode]
    assert 'error' not in two, two.get('traceback')
    assert two['fsdp'] == (mode != 'ddp') and two['loader']['action'] == 'upcycled'
    assert two['opened_by_rank'] == [1, 0], 'only rank 0 reads the dense checkpoint'
    for split in ('domain', 'generic'):
        (b1, ce1), (b2, ce2) = one['ce0'][split][0], two['ce0'][split][0]
        assert b1 == b2 == 0 and abs(ce1 - ce2) < 1e-5, (split, ce1, ce2)
    for key in ('loss', 'lbl'):
        assert [b for b, _ in one[key]] == [b for b, _ in two[key]] == [0, 1], (key, one[key], two[key])
        torch.testing.assert_close([v for _, v in two[key]], [v for _, v in one[key]], rtol=1e-5, atol=1e-6)
    p1, p2 = _params(out, 'single'), _params(out, mode)
    assert p1.keys() == p2.keys()
    w1 = 'model.transformer.blocks.0.ffn.experts.mlp.w1'
    assert expert_spread(p1[w1], 8) > 0, 'the experts should have trained apart'
    for key in p1:
        torch.testing.assert_close(p2[key], p1[key], rtol=0, atol=1e-5, msg=lambda m: f'{key}: {m}')


@pytest.mark.parametrize('mode', ['fsdp2_resume', 'fsdp2_mixed_resume'])
def test_restart_resumes_own_checkpoint_and_skips_dense_load(runs, mode):
    """A restart (sharded state dict; mixed init + full state dict, issue 8 defects 3 and 5) loads the run's own
    checkpoint once, without reading the dense one, and continues with trained experts."""
    out, results = runs
    r = results[mode]
    assert 'error' not in r, r.get('traceback')
    assert r['loader']['action'] == 'skipped', r['loader']
    assert r['opened_by_rank'] == [0, 0], 'a resumed run reads no dense checkpoint'
    assert Path(r['loader']['autoresume_checkpoint']).parent == out / MODES[mode]['run_name'] / 'checkpoints'
    assert r['loader']['fresh_after_load'] is False
    assert r['batch'] == 4 and [b for b, _ in r['loss']] == [2, 3]
    assert expert_spread(_params(out, mode)['model.transformer.blocks.0.ffn.experts.mlp.w1'], 8) > 0


@pytest.mark.parametrize('mode', TRAINED)
def test_router_monitor_matches_one_process(runs, mode):
    """`upcycle_router_monitor` (interval 1) logs, on every rank, the statistics of the whole global batch: the same
    load per expert, entropy, LBL and expert spread as one process, at the same steps: its all-reduce over ranks,
    and its spread from the unsharded experts in forward under FSDP2 (with activation checkpointing too)."""
    out, results = runs
    one, two = results['single']['router'], results[mode].get('router')
    assert 'error' not in results[mode], results[mode].get('traceback')
    n_layers, experts = 2, 8
    want = {f'router/layer{i}/{m}' for i in range(n_layers) for m in
            ['entropy', 'lbl', 'expert_spread'] + [f'load/expert{e}' for e in range(experts)]} | {'router/lbl'}
    assert set(one) == set(two) == want, sorted(set(one) ^ set(two))
    for key in sorted(want):
        # (InMemoryLogger stamps a value with the trainer's batch count when it is logged: batch_end of 0, 1)
        assert [b for b, _ in two[key]] == [b for b, _ in one[key]] == [1, 2], (key, one[key], two[key])
        torch.testing.assert_close([v for _, v in two[key]], [v for _, v in one[key]], rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f'{key}: {m}')
    # Load fractions are invariant to counting a token twice, so check the count: this rank's share of the global
    # batch (4 x 32 tokens), once, with activation checkpointing too (its recompute in backward is not counted).
    for name, world in (('single', 1), (mode, 2)):
        counted = {int(i): n for i, n in results[name]['router_tokens'].items()}  # JSON made the keys strings
        assert counted == {i: 4 * SEQ / world for i in range(n_layers)}, (name, counted)
    spread = [v for _, v in one['router/layer0/expert_spread']]
    assert spread[0] == 0.0 and spread[1] > 0, spread  # fresh copies at batch 0; trained apart by batch 1


def test_safetensors_bare_keys_relative_path_and_zloss(single, corpus, dense_checkpoint, tmp_path, monkeypatch):
    """`upcycle.from` a bare-key (HF MPT-style) .safetensors file by a relative path, z-loss on: the same start as
    the .pt by absolute path, and the z-loss is logged and added to `total`."""
    bare = {k.removeprefix('model.'): v for k, v in load_state_dict(str(dense_checkpoint)).items()}
    save_safetensors(bare, str(tmp_path / 'dense.safetensors'))
    monkeypatch.chdir(tmp_path)
    cfg = _base(corpus, dense_checkpoint, tmp_path / 'st')
    cfg['variables']['dense_checkpoint'] = 'dense.safetensors'
    cfg['upcycle']['zloss_weight'] = 0.001
    cfg['variables']['max_duration'] = '1ba'
    trainer = run_train(cfg)
    one = single[1]
    for split in ('domain', 'generic'):
        ce = logged(trainer, f'metrics/eval/{split}/LanguageCrossEntropy')[0]
        assert ce[0] == 0 and abs(ce[1] - one['ce0'][split][0][1]) < 1e-6
    loss, lbl = logged(trainer, 'loss/train/loss')[0][1], logged(trainer, 'loss/train/lbl')[0][1]
    zloss, total = logged(trainer, 'loss/train/router_zloss')[0][1], logged(trainer, 'loss/train/total')[0][1]
    assert abs(loss - one['loss'][0][1]) < 1e-5 and abs(lbl - one['lbl'][0][1]) < 1e-6
    assert zloss > 0 and abs(total - (loss + lbl + zloss)) < 1e-5
    trainer.close()


def test_fsdp2_run_killed_with_sigkill_resumes_with_trained_experts(killed, runs):
    """`composer -n 2` FSDP2 (sharded checkpoints) SIGKILLed (launcher and ranks, no cleanup) by a callback right
    after its first checkpoint (batch 2), then restarted: it resumes at exactly that batch with trained experts."""
    (first, wrote_results), (out, results) = killed, runs
    assert first.returncode == -signal.SIGKILL, first.stdout[-3000:] + first.stderr[-3000:]
    marker = json.loads((out / 'killed_at.json').read_text())
    assert marker['batch'] == 2 and not wrote_results, marker  # killed mid-run, before batch 2
    assert (out / 'killed' / 'checkpoints' / 'latest-rank0.pt').exists()
    r = results['killed_resume']
    assert 'error' not in r, r.get('traceback')
    assert r['loader']['action'] == 'skipped' and r['loader']['fresh_after_load'] is False, r['loader']
    assert r['opened_by_rank'] == [0, 0], 'a resumed run reads no dense checkpoint'
    assert r['batch'] == 4 and [b for b, _ in r['loss']] == [2, 3]  # continued from the checkpoint, not from 0
    assert expert_spread(_params(out, 'killed_resume')['model.transformer.blocks.0.ffn.experts.mlp.w1'], 8) > 0
