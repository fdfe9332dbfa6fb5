"""Two-GPU FSDP upcycling (bf16, activation checkpointing, router monitor) through `composer -n 2`. GPU only:
`bash scripts/gpu_check.sh` runs it when the machine has >= 2 GPUs."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import REPO
from foundry_upcycle.loggers import read_jsonl
from test_train import _cli_args, _env


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason='needs 2 GPUs')
def test_two_gpu_fsdp_upcycle_with_checkpointing(corpus, dense_checkpoint, tmp_path):
    out = tmp_path / 'run'
    cmd = [sys.executable, '-m', 'composer.cli.launcher', '-n', '2', '-c', 'llmfoundry', 'train',
           str(REPO / 'yamls/tiny/upcycle.yaml'),
           *_cli_args(corpus, out, dense_checkpoint=dense_checkpoint, max_duration='4ba', save_interval='4ba',
                      eval_interval='4ba'),
           'precision=amp_bf16', 'fsdp_config.sharding_strategy=FULL_SHARD', 'fsdp_config.mixed_precision=PURE',
           'fsdp_config.activation_checkpointing=true', 'callbacks.upcycle_router_monitor.interval=1']
    run = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    metrics = read_jsonl(out / 'metrics.jsonl')
    print({k: v for k, v in metrics.items() if k.startswith(('loss/train', 'router/lbl', 'router/layer0/expert'))})
    assert len(metrics['loss/train/lbl']) == 4 and len(metrics['router/lbl']) == 4
    assert metrics['router/layer0/expert_spread'][0][1] == 0.0 and metrics['router/layer0/expert_spread'][-1][1] > 0
