"""Memory claims as tests: export, import and the upcycle loader stream one tensor job at a time, and a .pt's
optimizer state is never read.

Live tensor bytes are tracked with `weakref.finalize`: every tensor a source reads and every tensor a job yields is
counted (once per storage) until it is garbage; the peak must stay under about twice the largest job (a job holds
its source tensor plus what it yields), whatever the depth. A consumer that materialised the model, or a plan
that read its tensors up front, breaks the bound at these depths.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch

from foundry_upcycle import jobs as jobs_mod
from foundry_upcycle import reader, sharded_load
from foundry_upcycle.export import writer

LAYERS = 6


class LiveBytes:
    """Bytes of the tracked tensors' storages that are still alive; `peak` is the maximum seen."""

    def __init__(self):
        self.live: dict[int, list[int]] = {}
        self.now = self.peak = self.tracked = 0

    def track(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        entry = self.live.setdefault(key, [0, storage.nbytes()])
        if entry[0] == 0:
            self.now += entry[1]
            self.peak = max(self.peak, self.now)
        entry[0] += 1
        self.tracked += 1
        weakref.finalize(t, self._release, key)
        return t

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.now -= entry[1]
            del self.live[key]


@pytest.fixture
def live(monkeypatch) -> LiveBytes:
    """Tracks what every source reads and every job yields, in the writer and in the loader."""
    tracker = LiveBytes()
    for cls in (reader.SafetensorsSource, jobs_mod.MemorySource):
        real = cls.read
        monkeypatch.setattr(cls, 'read', lambda self, name, real=real: tracker.track(real(self, name)))
    real_run = jobs_mod.run_job

    def run_job(job):
        for spec, tensor in real_run(job):
            yield spec, tracker.track(tensor)
    monkeypatch.setattr(writer, 'run_job', run_job)
    monkeypatch.setattr(sharded_load, 'run_job', run_job)
    return tracker


def _bounded(live: LiveBytes, largest_job: int, total: int) -> None:
    assert live.tracked > 0, 'nothing was tracked: the test would pass whatever the code did'
    assert total > 3 * largest_job, 'the model must dwarf one job for the bound to mean anything'
    assert live.peak <= 2 * largest_job, (live.peak, largest_job)


def test_import_hf_streams_one_job_at_a_time(live, tmp_path):
    from foundry_upcycle.export.hf_import import import_hf_to_mixtral
    from foundry_upcycle.llama_to_mixtral import mixtral_jobs, read_dense_config
    from foundry_upcycle.weights import UpcycleWeights
    from test_import import save_dense
    src = tmp_path / 'dense'
    save_dense(src, num_hidden_layers=LAYERS, intermediate_size=256, vocab_size=64)
    jobs = mixtral_jobs(reader.open_source(src), read_dense_config(src), UpcycleWeights(4))
    live.peak = 0
    import_hf_to_mixtral(src, tmp_path / 'moe', num_experts=4, progress=False)
    _bounded(live, max(j.nbytes for j in jobs), sum(j.nbytes for j in jobs))


def _mpt_moe(layers: int):
    from test_export import MOE_FFN, mpt_cfg
    from llmfoundry.models.mpt import ComposerMPTCausalLM
    cfg = mpt_cfg(ffn={**MOE_FFN, 'ffn_hidden_size': 256}, n_layers=layers, vocab_size=64)
    torch.manual_seed(0)
    return cfg, ComposerMPTCausalLM(loss_fn='torch_crossentropy', **{k: v for k, v in cfg.items() if k != 'name'})


def test_export_streams_one_job_at_a_time(live, tmp_path):
    from safetensors.torch import save_file
    from foundry_upcycle.export.hf_export import check_target, export_source, plan_export
    cfg, model = _mpt_moe(LAYERS)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / 'w.safetensors'))
    del model
    source = reader.open_source(tmp_path / 'w.safetensors')
    target, arch = check_target(cfg)
    jobs = plan_export(source, arch, target)
    live.peak = 0
    export_source(source, cfg, tmp_path / 'hf', progress=False)
    _bounded(live, max(j.nbytes for j in jobs), sum(j.nbytes for j in jobs))


def test_upcycle_loader_streams_one_job_at_a_time(live, tmp_path):
    """The loader inside Composer's Trainer (one process): the dense file is read tensor by tensor and each MoE
    tensor is freed once copied into the model."""
    from composer import Trainer
    from safetensors.torch import save_file
    from test_upcycle import build, mpt_cfg
    from foundry_upcycle.callbacks import UpcycleLoader
    from foundry_upcycle.config import UpcycleConfig, moe_ffn_config
    from foundry_upcycle.upcycle import mpt_moe_jobs
    dense_cfg = {**mpt_cfg(), 'n_layers': LAYERS, 'expansion_ratio': 4}
    save_file({k: v.contiguous() for k, v in build(dense_cfg).state_dict().items()}, str(tmp_path / 'd.safetensors'))
    ucfg = UpcycleConfig(num_experts=4)
    moe = build({**dense_cfg, 'ffn_config': moe_ffn_config(dense_cfg, ucfg, 'torch')})
    jobs = mpt_moe_jobs(reader.open_source(tmp_path / 'd.safetensors'), ucfg.weights())
    live.peak = 0
    loader = UpcycleLoader(source=str(tmp_path / 'd.safetensors'), **ucfg.weights().to_mapping())
    Trainer(model=moe, callbacks=[loader], device='cpu', progress_bar=False, log_to_console=False).close()
    assert loader.report['action'] == 'upcycled'
    _bounded(live, max(j.nbytes for j in jobs), sum(j.nbytes for j in jobs))


def test_pt_optimizer_state_is_never_read(tmp_path):
    """A Composer checkpoint whose optimizer state is ~130x its model: opening it and reading every model tensor
    through the reader raises the process's peak resident memory far less than the optimizer state's size (it
    stays mapped, untouched). The checkpoint is written by another process, so the peak is the reader's."""
    write = textwrap.dedent(f"""
        import torch
        model = {{f'model.w{{i}}': torch.randn(256, 256) for i in range(4)}}  # 1 MiB
        optim = {{f'exp_avg{{i}}': torch.randn(1024, 1024) for i in range(32)}}  # 128 MiB
        torch.save({{'state': {{'model': model, 'optimizers': {{'adam': optim}}}}}}, {str(tmp_path / 'c.pt')!r})
    """)
    read = textwrap.dedent(f"""
        import json, torch
        from foundry_upcycle import reader
        def status(key):
            with open('/proc/self/status') as f:
                return next(int(l.split()[1]) for l in f if l.startswith(key + ':')) / 1024
        before = status('VmRSS')
        source = reader.open_source({str(tmp_path / 'c.pt')!r})
        sums = [source.read(name).sum().item() for name in source.specs]
        print(json.dumps({{'peak_rise_mb': status('VmHWM') - before, 'names': sorted(source.specs)}}))
    """)
    for script in (write, read):
        proc = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result['names'] == [f'model.w{i}' for i in range(4)]
    assert result['peak_rise_mb'] < 40, result  # reading the optimizer state would add ~128 MiB
