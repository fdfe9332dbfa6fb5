"""Peak host memory (RSS) per rank of the upcycle loader, 1 vs N processes, on CPU (gloo).

Writes a synthetic dense MPT Composer checkpoint (model + Adam-like optimizer state, a few hundred MB), builds the
upcycled MoE model the way `llmfoundry train` does, and constructs Composer's Trainer (FSDP2 FULL_SHARD, the only
sharded mode Composer 0.32 runs on CPU; `init_device: meta` needs CUDA there) with the `upcycle_loader` callback:
INIT -> wrap -> BEFORE_LOAD (the load) -> AFTER_LOAD. Each rank reports its RSS after building the model ("before")
and its peak RSS over the Trainer construction. Two initialisations:
- `cpu`: every rank builds the whole model, FSDP2 shards it, then the loader runs. The peak above "before" is the
  loader's cost: rank 0 holds the MoE state dict it builds (plus the memory-mapped dense pages it reads); every other
  rank receives one tensor at a time, so its cost must stay far below the state dict and not grow with ranks.
- `mixed`: rank 0 builds the model, the others build it on meta; the loader fills rank 0's model and Composer's wrap
  broadcasts it.

    .venv/bin/python benchmarks/loader_memory.py [--runs cpu:1 cpu:2 mixed:2] [--layers 8] [--d-model 512] [--experts 4]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

MB = 2**20


def _dense_model_cfg(args) -> dict:
    return {
        'name': 'mpt_causal_lm', 'd_model': args.d_model, 'n_heads': 8, 'n_layers': args.layers, 'expansion_ratio': 4,
        'max_seq_len': 128, 'vocab_size': 4096, 'no_bias': True, 'norm_type': 'rmsnorm', 'learned_pos_emb': False,
        'tie_word_embeddings': False, 'loss_fn': 'torch_crossentropy',
        'attn_config': {'attn_impl': 'torch', 'rope': True, 'rope_impl': 'hf'},
        'ffn_config': {'ffn_type': 'mptglu', 'ffn_act_fn': {'name': 'silu'}},
    }


def _rss_mb() -> float:
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('VmRSS:')) / 1024


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_dense(args, path: Path) -> dict:
    import torch
    from llmfoundry.utils.builders import build_composer_model
    cfg = _dense_model_cfg(args)
    model = build_composer_model(name=cfg.pop('name'), cfg={**cfg, 'init_device': 'cpu'}, tokenizer=None)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optim = {i: {'exp_avg': torch.zeros_like(v), 'exp_avg_sq': torch.zeros_like(v)} for i, v in enumerate(sd.values())}
    torch.save({'state': {'model': sd, 'optimizers': {'DecoupledAdamW': {'state': optim}}}}, path)
    return {'model_mb': sum(v.numel() * v.element_size() for v in sd.values()) / MB,
            'file_mb': path.stat().st_size / MB}


def worker(args) -> None:
    from composer import Trainer
    from composer.utils import FSDP2Config, dist
    from llmfoundry.models.utils import init_empty_weights
    from llmfoundry.utils.builders import build_composer_model

    from foundry_upcycle.callbacks import UpcycleLoader
    from foundry_upcycle.config import UpcycleConfig
    from foundry_upcycle.transforms import upcycled_model_config
    import contextlib
    dist.initialize_dist('cpu')
    on_meta = args.init == 'mixed' and dist.get_global_rank() != 0
    cfg = upcycled_model_config({**_dense_model_cfg(args), 'init_device': 'meta' if on_meta else 'cpu'},
                                UpcycleConfig(num_experts=args.experts), 'torch')
    with init_empty_weights() if on_meta else contextlib.nullcontext():
        model = build_composer_model(name=cfg.pop('name'), cfg=cfg, tokenizer=None)
    fsdp = FSDP2Config(mixed_precision='FULL')
    if args.init == 'mixed':  # what llmfoundry sets for init_device: mixed
        fsdp = FSDP2Config(mixed_precision='FULL', load_monolith_rank0_only=True, state_dict_type='full')
        fsdp.sync_module_states = True
    before = _rss_mb()
    loader = UpcycleLoader(source=args.checkpoint, num_experts=args.experts)
    trainer = Trainer(model=model, callbacks=[loader], parallelism_config={'fsdp': fsdp}, device='cpu',
                      progress_bar=False, log_to_console=False)
    assert loader.report.get('action') == 'upcycled', loader.report
    shard_mb = sum(p.to_local().numel() * p.element_size() for p in trainer.state.model.parameters()) / MB
    result = {'init': args.init, 'rank': dist.get_global_rank(), 'world': dist.get_world_size(), 'rss_before_mb': before,
              'peak_mb': _peak_mb(), 'peak_above_before_mb': _peak_mb() - before, 'own_shard_mb': shard_mb}
    Path(args.result_dir, f'rank{dist.get_global_rank()}.json').write_text(json.dumps(result))
    trainer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--runs', nargs='+', default=['cpu:1', 'cpu:2', 'mixed:2'], help='INIT:NPROCS ...')
    parser.add_argument('--init', default='cpu', help=argparse.SUPPRESS)
    parser.add_argument('--layers', type=int, default=8)
    parser.add_argument('--d-model', type=int, default=512)
    parser.add_argument('--experts', type=int, default=4)
    parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--checkpoint', help=argparse.SUPPRESS)
    parser.add_argument('--result-dir', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / 'dense.pt'
        sizes = write_dense(args, ckpt)
        print(f'dense checkpoint: {sizes["file_mb"]:.0f} MB on disk (model {sizes["model_mb"]:.0f} MB + optimizer state), '
              f'{args.layers} layers, d_model {args.d_model}, {args.experts} experts')
        print(f'{"init":>5} {"ranks":>5} {"rank":>4} {"RSS before":>10} {"peak":>8} {"peak - before":>13} '
              f'{"own shard":>9}  (MB)')
        for spec in args.runs:
            init, n = spec.split(':')[0], int(spec.split(':')[1])
            out = Path(tmp) / f'{init}{n}'
            out.mkdir()
            cmd = [sys.executable, '-m', 'composer.cli.launcher', '-n', str(n), '--master_port', str(29400 + n),
                   __file__, '--worker', '--init', init, '--checkpoint', str(ckpt), '--result-dir', str(out), '--layers',
                   str(args.layers), '--d-model', str(args.d_model), '--experts', str(args.experts)]
            run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, 'FSDP_VERSION': '2'})
            if run.returncode != 0 or len(list(out.glob('rank*.json'))) != n:
                sys.exit(f'{n} ranks failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}')
            for r in sorted((json.loads(p.read_text()) for p in out.glob('rank*.json')), key=lambda r: r['rank']):
                print(f'{init:>5} {n:>5} {r["rank"]:>4} {r["rss_before_mb"]:>10.0f} {r["peak_mb"]:>8.0f} '
                      f'{r["peak_above_before_mb"]:>13.0f} {r["own_shard_mb"]:>9.0f}')


if __name__ == '__main__':
    main()
