"""Scale benchmark for `foundry-upcycle export`: peak memory of the streamed MPT MoE -> Mixtral export vs depth.

For each depth a synthetic upcycled MPT checkpoint (random bf16, 8 experts, Llama-3-8B width by default: d 4096,
FFN 14336, 32 heads / 8 KV heads, vocab 128256) is written one tensor at a time, then exported in a fresh
process, which prints its peak RSS (getrusage ru_maxrss) and its peak anonymous RSS (RssAnon sampled from
/proc/self/status: memory the export allocated itself, not file pages it read). Streamed, both stay flat in depth:
one job (one layer's [E F, D] expert tensor, ~0.94 GB bf16 at this width) at a time.
Sources: --format safetensors (read tensor by tensor) or pt (a torch.save'd Composer-style checkpoint with
optimizer state, read with torch.load(mmap=True): the optimizer state is never read; a pt source needs its whole
state dict in the generating process's memory, so use it at a smaller width).

    python benchmarks/export_scale.py                          # depths 1 and 2 at Llama-3-8B width, safetensors
    python benchmarks/export_scale.py --format pt --d-model 2048 --ffn 7168 --heads 16 --kv-heads 4 --vocab 32000
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import _children  # benchmarks/ is on sys.path when a script here runs

GB = 1e9


peak_rss_mb = _children.peak_rss_mb


class AnonPeak:
    """Samples RssAnon every 10 ms in a thread; .peak_mb after stop()."""

    def __init__(self):
        self.peak_mb, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            for line in Path('/proc/self/status').read_text().splitlines():
                if line.startswith('RssAnon:'):
                    self.peak_mb = max(self.peak_mb, int(line.split()[1]) / 1024)
            time.sleep(0.01)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_mb


def model_cfg(a, depth: int) -> dict:
    return {'name': 'mpt_causal_lm', 'd_model': a.d_model, 'n_heads': a.heads, 'n_layers': depth,
            'max_seq_len': 4096, 'vocab_size': a.vocab, 'no_bias': True, 'norm_type': 'rmsnorm',
            'tie_word_embeddings': False, 'learned_pos_emb': False,
            'attn_config': {'attn_type': 'grouped_query_attention', 'kv_n_heads': a.kv_heads, 'rope': True,
                            'rope_impl': 'hf', 'attn_impl': 'torch'},
            'ffn_config': {'ffn_type': 'torch_dmoe', 'ffn_hidden_size': a.ffn, 'ffn_act_fn': {'name': 'silu'},
                           'mlp_type': 'glu', 'moe_num_experts': a.experts, 'moe_top_k': 2,
                           'moe_normalize_expert_weights': 1, 'moe_jitter_eps': None}}


def shapes(a, depth: int) -> list[tuple[str, tuple[int, ...]]]:
    hd = a.d_model // a.heads
    D, EF = a.d_model, a.experts * a.ffn
    out = [('model.transformer.wte.weight', (a.vocab, D))]
    for i in range(depth):
        p = f'model.transformer.blocks.{i}.'
        out += [(p + 'norm_1.weight', (D,)), (p + 'attn.Wqkv.weight', ((a.heads + 2 * a.kv_heads) * hd, D)),
                (p + 'attn.out_proj.weight', (D, a.heads * hd)), (p + 'norm_2.weight', (D,)),
                (p + 'ffn.router.layer.weight', (a.experts, D)), (p + 'ffn.experts.mlp.w1', (EF, D)),
                (p + 'ffn.experts.mlp.v1', (EF, D)), (p + 'ffn.experts.mlp.w2', (EF, D))]
    return out + [('model.transformer.norm_f.weight', (D,)), ('model.lm_head.weight', (a.vocab, D))]


def child_generate(a, depth: int, out: Path) -> dict:
    import torch
    from foundry_upcycle.export.writer import Job, TensorSpec, write_sharded
    g = torch.Generator().manual_seed(0)

    def make(shape):
        return (torch.ones(shape, dtype=torch.bfloat16) if len(shape) == 1 else
                torch.empty(shape, dtype=torch.bfloat16).uniform_(-0.0346, 0.0346, generator=g))

    specs = shapes(a, depth)
    out.mkdir(parents=True)
    if a.format == 'pt':
        sd = {n: make(s) for n, s in specs}
        torch.save({'state': {'model': sd, 'optimizers': {'adam': {k: torch.zeros_like(v) for k, v in sd.items()}}}},
                   out / 'ckpt.pt')
        return {'path': str(out / 'ckpt.pt'), 'bytes': sum(v.numel() * 2 for v in sd.values())}
    jobs = [Job((TensorSpec(n, s, torch.bfloat16),), lambda s=s: [make(s)]) for n, s in specs]
    write_sharded(out, jobs, max_shard_bytes=2**62, desc='generating', progress=False)
    return {'path': str(out / 'model.safetensors'), 'bytes': sum(j.nbytes for j in jobs)}


def child_export(a, depth: int, src: str, recipe: Path, out: Path) -> dict:
    from foundry_upcycle.export.hf_export import export_checkpoint
    anon = AnonPeak()
    base = peak_rss_mb()
    t = time.perf_counter()
    export_checkpoint(src, str(recipe), str(out), target='mixtral', progress=False)
    seconds = time.perf_counter() - t
    return {'seconds': seconds, 'peak_rss_mb': peak_rss_mb(), 'peak_anon_rss_mb': anon.stop(),
            'baseline_rss_mb': base, 'bytes_written': sum(p.stat().st_size for p in out.glob('*.safetensors'))}


def run_child(a, *args: str) -> dict:
    return _children.run_child(__file__, forward_args(a), *args)


def forward_args(a) -> list[str]:
    return [f'--d-model={a.d_model}', f'--ffn={a.ffn}', f'--heads={a.heads}', f'--kv-heads={a.kv_heads}',
            f'--vocab={a.vocab}', f'--experts={a.experts}', f'--format={a.format}']


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--layers', default='1,2')
    p.add_argument('--d-model', type=int, default=4096)
    p.add_argument('--ffn', type=int, default=14336)
    p.add_argument('--heads', type=int, default=32)
    p.add_argument('--kv-heads', type=int, default=8)
    p.add_argument('--vocab', type=int, default=128256)
    p.add_argument('--experts', type=int, default=8)
    p.add_argument('--format', choices=('safetensors', 'pt'), default='safetensors')
    p.add_argument('--workdir', default=tempfile.gettempdir())
    p.add_argument('--child', nargs='+')
    a = p.parse_args()
    if a.child:
        kind, depth, *paths = a.child
        if kind == 'generate':
            print(json.dumps(child_generate(a, int(depth), Path(paths[0]))))
        else:
            print(json.dumps(child_export(a, int(depth), paths[0], Path(paths[1]), Path(paths[2]))))
        return
    from omegaconf import OmegaConf
    print(f'export of an upcycled MPT ({a.experts} experts) at d_model {a.d_model}, FFN {a.ffn}, vocab {a.vocab}, '
          f'source {a.format}; machine load average {os.getloadavg()[0]:.1f} (shared machine: timings are loaded)')
    print('| layers | source GB | export s | peak RSS MB | peak anon RSS MB |')
    print('|---|---|---|---|---|')
    for depth in [int(x) for x in a.layers.split(',')]:
        work = Path(tempfile.mkdtemp(prefix='export-scale-', dir=a.workdir))
        try:
            recipe = work / 'recipe.yaml'
            OmegaConf.save({'model': model_cfg(a, depth)}, recipe)
            src = run_child(a, 'generate', str(depth), str(work / 'src'))
            r = run_child(a, 'export', str(depth), src['path'], str(recipe), str(work / 'hf'))
            print(f"| {depth} | {src['bytes'] / GB:.2f} | {r['seconds']:.1f} | {r['peak_rss_mb']:,.0f} "
                  f"| {r['peak_anon_rss_mb']:,.0f} |", flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main()
