"""Peak host memory per rank of the upcycle loader (the dense load at BEFORE_LOAD), 1 vs N processes, on CPU (gloo).

Writes a synthetic dense checkpoint, builds the upcycled model the way `llmfoundry train` does, and constructs
Composer's Trainer (FSDP2 FULL_SHARD, the sharded mode Composer 0.32 runs on CPU) with the `upcycle_loader` callback:
INIT -> wrap -> BEFORE_LOAD (the load) -> AFTER_LOAD. Layouts:
- `mpt`: a dense MPT Composer checkpoint (.pt, with Adam-like optimizer state) -> `mpt_upcycle_causal_lm`
  (torch_dmoe, MegaBlocks layout: a job is one [E*F, D] expert tensor);
- `hf`: a dense Llama safetensors directory -> `hf_upcycle_causal_lm` (transformers Mixtral: a job yields one
  expert's [F, D] matrix at a time).
A probe callback ahead of the loader resets the kernel's peak-RSS counter (/proc/self/clear_refs) at BEFORE_LOAD and
reads it at AFTER_LOAD, so "load peak" is the loader's own high-water mark above the RSS it started from (file
pages read through the memory map count). Each rank also reports its FSDP2 shard.

    .venv/bin/python benchmarks/loader_memory.py --layout mpt hf --ranks 1 2 --layers 1 2 \\
        --d-model 4096 --ffn 14336 --heads 32 --kv-heads 8 --experts 8 --dtype bfloat16    # Llama-3-8B width
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MB = 2**20


def _status(key: str) -> float:
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ':')) / 1024


def _mpt_cfg(a) -> dict:
    return {'name': 'mpt_causal_lm', 'd_model': a.d_model, 'n_heads': a.heads, 'n_layers': a.layers,
            'max_seq_len': 128, 'vocab_size': a.vocab, 'no_bias': True, 'norm_type': 'rmsnorm', 'learned_pos_emb': False,
            'tie_word_embeddings': False, 'loss_fn': 'torch_crossentropy',
            'attn_config': {'attn_impl': 'torch', 'rope': True, 'rope_impl': 'hf',
                            'attn_type': 'grouped_query_attention', 'kv_n_heads': a.kv_heads},
            'ffn_config': {'ffn_type': 'mptglu', 'ffn_act_fn': {'name': 'silu'}, 'ffn_hidden_size': a.ffn}}


def _llama_cfg(a):
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=a.d_model, intermediate_size=a.ffn, num_hidden_layers=a.layers,
                       num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, vocab_size=a.vocab,
                       max_position_embeddings=128, torch_dtype=a.dtype)


def write_dense(a, out: Path) -> Path:
    """Random dense weights (torch.randn, the model's shapes), written tensor by tensor."""
    import torch
    from foundry_upcycle.export.writer import write_sharded
    from foundry_upcycle.jobs import Job, TensorSpec
    dtype = getattr(torch, a.dtype)
    if a.layout == 'hf':
        from transformers import LlamaForCausalLM
        with torch.device('meta'):
            shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(_llama_cfg(a)).state_dict().items()}
        jobs = [Job((TensorSpec(k, s, dtype),), lambda s=s: [(torch.randn(s) * 0.02).to(dtype)]) for k, s in shapes.items()]
        out.mkdir()
        write_sharded(out, jobs, 2 * 2**30, progress=False)
        _llama_cfg(a).save_pretrained(str(out))
        return out
    from llmfoundry.models.mpt import ComposerMPTCausalLM
    cfg = _mpt_cfg(a)
    cfg.pop('name')
    with torch.device('meta'):
        shapes = {k: tuple(v.shape) for k, v in ComposerMPTCausalLM(**cfg).state_dict().items()}
    sd = {k: (torch.randn(s) * 0.02).to(dtype) for k, s in shapes.items()}
    optim = {i: {'exp_avg': torch.zeros_like(v), 'exp_avg_sq': torch.zeros_like(v)} for i, v in enumerate(sd.values())}
    torch.save({'state': {'model': sd, 'optimizers': {'DecoupledAdamW': {'state': optim}}}}, out)
    return out


def worker(a) -> None:
    import torch
    from composer import Trainer
    from composer.core import Callback
    from composer.utils import FSDP2Config, dist
    from llmfoundry.utils.builders import build_composer_model

    from foundry_upcycle.callbacks import UpcycleLoader
    from foundry_upcycle.config import UpcycleConfig
    from foundry_upcycle.transforms import upcycled_hf_model_config, upcycled_model_config
    dist.initialize_dist('cpu')
    ucfg = UpcycleConfig(num_experts=a.experts)
    if a.layout == 'hf':
        cfg, _ = upcycled_hf_model_config({'name': 'hf_causal_lm', 'pretrained_model_name_or_path': a.checkpoint,
                                           'pretrained': True, 'init_device': 'meta'}, ucfg)
    else:
        cfg = upcycled_model_config({**_mpt_cfg(a), 'init_device': 'meta'}, ucfg, 'torch')
    # Built on meta and materialised as zeros: the memory of a random init without its CPU time (memory is measured)
    model = build_composer_model(name=cfg.pop('name'), cfg=cfg, tokenizer=None)
    model = model.to_empty(device='cpu').to(getattr(torch, a.dtype))
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.zero_()
    probe = {}

    class Probe(Callback):
        def before_load(self, state, logger):
            Path('/proc/self/clear_refs').write_text('5')  # reset VmHWM to the current RSS
            probe['start'] = _status('VmRSS')

        def after_load(self, state, logger):
            probe['peak'] = _status('VmHWM')

    loader = UpcycleLoader(source=a.checkpoint, **ucfg.weights().to_mapping())
    trainer = Trainer(model=model, callbacks=[Probe(), loader], parallelism_config={'fsdp': FSDP2Config(
        mixed_precision='FULL')}, device='cpu', progress_bar=False, log_to_console=False)
    assert loader.report.get('action') == 'upcycled', loader.report
    shard = sum(p.to_local().numel() * p.element_size() for p in trainer.state.model.parameters()) / MB
    result = {'rank': dist.get_global_rank(), 'start_mb': probe['start'], 'load_peak_mb': probe['peak'] - probe['start'],
              'own_shard_mb': shard}
    Path(a.result_dir, f'rank{dist.get_global_rank()}.json').write_text(json.dumps(result))
    trainer.close()


def _job_mb(a) -> dict:
    import torch
    size = torch.empty((), dtype=getattr(torch, a.dtype)).element_size()
    dense = a.ffn * a.d_model * size / MB
    return {'dense tensor': dense, 'largest job': dense * (a.experts if a.layout == 'mpt' else 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--layout', nargs='+', default=['mpt', 'hf'], choices=['mpt', 'hf'])
    p.add_argument('--ranks', nargs='+', type=int, default=[1, 2])
    p.add_argument('--layers', nargs='+', type=int, default=[1, 2])
    p.add_argument('--d-model', type=int, default=512)
    p.add_argument('--ffn', type=int, default=1792)
    p.add_argument('--heads', type=int, default=8)
    p.add_argument('--kv-heads', type=int, default=2)
    p.add_argument('--vocab', type=int, default=4096)
    p.add_argument('--experts', type=int, default=8)
    p.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float32'])
    p.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--checkpoint', help=argparse.SUPPRESS)
    p.add_argument('--result-dir', help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        a.layout, a.layers = a.layout[0], a.layers[0]
        return worker(a)
    print(f'd_model {a.d_model}, ffn {a.ffn}, heads {a.heads}/{a.kv_heads}, vocab {a.vocab}, {a.experts} experts, '
          f'{a.dtype}; FSDP2 FULL_SHARD on gloo. MB = 2^20 bytes.')
    print(f'{"layout":>6} {"layers":>6} {"ranks":>5} {"rank":>4} {"RSS at load":>11} {"load peak":>9} '
          f'{"own shard":>9} {"dense tensor":>12} {"largest job":>11}')
    for layout in a.layout:
        for layers in a.layers:
            with tempfile.TemporaryDirectory(dir=os.environ.get('LOADER_BENCH_TMP')) as tmp:
                args = argparse.Namespace(**{**vars(a), 'layout': layout, 'layers': layers})
                ckpt = write_dense(args, Path(tmp) / ('dense' if layout == 'hf' else 'dense.pt'))
                jobs = _job_mb(args)
                for n in a.ranks:
                    out = Path(tmp) / f'r{n}'
                    out.mkdir()
                    cmd = [sys.executable, '-m', 'composer.cli.launcher', '-n', str(n), '--master_port',
                           str(29600 + n), __file__, '--worker', '--layout', layout, '--layers', str(layers),
                           '--checkpoint', str(ckpt), '--result-dir', str(out), '--d-model', str(a.d_model),
                           '--ffn', str(a.ffn), '--heads', str(a.heads), '--kv-heads', str(a.kv_heads),
                           '--vocab', str(a.vocab), '--experts', str(a.experts), '--dtype', a.dtype]
                    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, 'FSDP_VERSION': '2'})
                    if run.returncode != 0 or len(list(out.glob('rank*.json'))) != n:
                        sys.exit(f'{layout} {n} ranks failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}')
                    for r in sorted((json.loads(f.read_text()) for f in out.glob('rank*.json')), key=lambda r: r['rank']):
                        print(f'{layout:>6} {layers:>6} {n:>5} {r["rank"]:>4} {r["start_mb"]:>11.0f} '
                              f'{r["load_peak_mb"]:>9.0f} {r["own_shard_mb"]:>9.0f} {jobs["dense tensor"]:>12.0f} '
                              f'{jobs["largest job"]:>11.0f}', flush=True)


if __name__ == '__main__':
    main()
