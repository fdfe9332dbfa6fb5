"""One GPU, foundry's own train() (what `llmfoundry train` runs): the upcycle block under FSDP1 (world size 1 still
wraps, so the loader's FSDP1 branch runs: `summon_full_params` per unit), FSDP2 and `init_device: meta`, with
activation checkpointing and the router monitor; the step-0 eval CE of every upcycled run equals CPT's. fp32 runs
use torch_dmoe (exact: 1e-4), amp_bf16 runs mb_dmoe when megablocks works here (bf16 rounding: 1e-2 relative).
All modes in one `composer -n 1 tests/distributed_worker.py` launch. GPU only: `bash scripts/device_check.sh`.
Without CUDA, $FOUNDRY_UPCYCLE_REHEARSE_GPU_TRAIN=1 (scripts/device_rehearsal.sh) runs what gloo can, CPT and the
FSDP2 fp32 arm, so the plumbing of this file is rehearsed before a GPU ever runs it.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import REPO, record_result
from foundry_upcycle.moe_backend import megablocks_unavailable_reason
from test_distributed import FSDP2, _base, _env, _fsdp

ON_GPU = torch.cuda.is_available()
REHEARSE = os.environ.get('FOUNDRY_UPCYCLE_REHEARSE_GPU_TRAIN') == '1'
ROUTER = {'callbacks.upcycle_router_monitor': {'interval': 1}}
BF16 = {'precision': 'amp_bf16'}
CPT = {'upcycle': None, 'callbacks.upcycle_router_monitor': None}  # _base adds the monitor; CPT has no MoE for it
MODES = {
    'cpt_fp32': {'overrides': {**CPT, **(_fsdp() if ON_GPU else {})}},  # FSDP1 needs CUDA (Composer)
    'upcycle_fsdp1_fp32': {'overrides': {**_fsdp(activation_checkpointing=True), **ROUTER}},
    'upcycle_fsdp2_fp32': {'overrides': {**_fsdp(activation_checkpointing=True), **ROUTER}, 'env': FSDP2},
    'cpt_bf16': {'overrides': {**CPT, **BF16, **_fsdp()}},
    'upcycle_fsdp1_bf16': {'overrides': {**BF16, **_fsdp(activation_checkpointing=True), **ROUTER}},
    'upcycle_fsdp2_bf16': {'overrides': {**BF16, **_fsdp(activation_checkpointing=True), **ROUTER}, 'env': FSDP2},
    'upcycle_meta_bf16': {'overrides': {**BF16, **_fsdp(activation_checkpointing=True), **ROUTER,
                                        'model.init_device': 'meta'}},
}
UPCYCLED = [m for m in MODES if m.startswith('upcycle')]
CPU_MODES = ('cpt_fp32', 'upcycle_fsdp2_fp32')  # what runs on gloo
CE_TOL = {'fp32': 1e-4, 'bf16': 1e-2}  # relative, against the CPT run of the same precision


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def runs(corpus, dense_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp('gpu_train')
    spec = out / 'spec.json'
    modes = MODES if ON_GPU else {m: MODES[m] for m in CPU_MODES}
    spec.write_text(json.dumps({'out': str(out), 'base': _base(corpus, dense_checkpoint, out), 'modes': modes}))
    cmd = [sys.executable, '-m', 'composer.cli.launcher', '-n', '1', '--master_port', str(_free_port()),
           str(REPO / 'tests' / 'distributed_worker.py'), str(spec)]
    run = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=out, timeout=900)
    assert (out / 'results.json').exists(), run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((out / 'results.json').read_text())
    record_result('train', {m: {k: v for k, v in r.items() if k != 'traceback'} for m, r in results.items()})
    return results


@pytest.mark.gpu
@pytest.mark.parametrize('mode', UPCYCLED)
def test_one_gpu_upcycle_step0_ce_equals_cpt(request, mode):
    if not ON_GPU and not (REHEARSE and mode in CPU_MODES):
        pytest.skip('needs CUDA' + ('' if mode in CPU_MODES else ' (FSDP1, meta init, mb_dmoe)'))
    runs = request.getfixturevalue('runs')
    precision = mode.rsplit('_', 1)[1]
    cpt, up = runs[f'cpt_{precision}'], runs[mode]
    assert 'error' not in cpt, cpt.get('traceback')
    assert 'error' not in up, up.get('traceback')
    assert up['loader']['action'] == 'upcycled', up['loader']
    if 'fsdp2' not in mode:  # FSDP1 wraps at world size 1 too (FSDP2 on one gloo process does not: seen on CPU)
        assert up['fsdp'], 'FSDP1 did not wrap: its loader branch (summon_full_params per unit) did not run'
    # backend auto: megablocks' dMoE for amp_bf16 where megablocks works, foundry's torch dMoE otherwise
    want = 'megablocks.' if precision == 'bf16' and megablocks_unavailable_reason() is None else 'llmfoundry.'
    assert up['ffn_types'] and all(t.startswith(want) for t in up['ffn_types']), up['ffn_types']
    for split in ('domain', 'generic'):
        (b0, ce_cpt), (b1, ce_up) = cpt['ce0'][split][0], up['ce0'][split][0]
        assert b0 == b1 == 0 and abs(ce_up - ce_cpt) <= CE_TOL[precision] * abs(ce_cpt), (split, ce_cpt, ce_up)
    assert len(up['router_lbl']) == up['batch'] == 2, up['router_lbl']  # the router monitor logged every step
