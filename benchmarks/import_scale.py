"""Scale benchmark for `foundry-upcycle import-hf`: peak RSS and throughput of the streaming Llama -> Mixtral import.

For each depth it writes a synthetic Llama-shaped checkpoint (random bf16, generated one tensor at a time straight
into safetensors shards, so the generator stays bounded too), upcycles it to E experts in a fresh process, and
prints peak RSS (getrusage ru_maxrss of that process) and GB/s. Peak RSS must not grow with the depth.
Default width is Llama-3-8B: d 4096, FFN 14336, 32 heads / 8 KV heads, vocab 128256. An 8-expert layer at that
width is ~2.8 GB of bf16 output, so free disk decides the depths: any that do not fit are dropped (and said so).

    python benchmarks/import_scale.py                     # depths 2 and 4 at Llama-3-8B width
    python benchmarks/import_scale.py --layers 2,4,8 --experts 8 --workdir /tmp
    python benchmarks/import_scale.py --d-model 1024 --ffn 3584 --heads 8 --kv-heads 2 --vocab 32000   # quick

Everything is written under a temp dir in --workdir and removed at the end (and between depths).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import _children  # noqa: E402  (benchmarks/ is on sys.path when a script here runs)

GB = 1e9


def layer_params(a) -> int:
    hd = a.d_model // a.heads
    attn = 2 * a.d_model * a.heads * hd + 2 * a.d_model * a.kv_heads * hd
    return attn + 3 * a.d_model * a.ffn + 2 * a.d_model


def sizes(a, depth: int) -> tuple[int, int]:
    """(source bytes, output bytes) in bf16."""
    emb = 2 * a.vocab * a.d_model  # untied embedding + LM head
    mlp = 3 * a.d_model * a.ffn
    src = 2 * (emb + a.d_model + depth * layer_params(a))
    out = src + 2 * depth * ((a.experts - 1) * mlp + a.experts * a.d_model)
    return src, out


peak_rss_mb = _children.peak_rss_mb


# ---------------------------------------------------------------- child processes

def child_generate(a, depth: int, out: Path) -> dict:
    import torch
    from transformers import LlamaConfig
    from foundry_upcycle.export.writer import Job, TensorSpec, write_sharded
    base = peak_rss_mb()
    g = torch.Generator().manual_seed(0)
    hd = a.d_model // a.heads

    def rand(shape):  # uniform with std 0.02: bf16 uniform_ is ~4x faster than normal_ on CPU
        return lambda: [torch.empty(shape, dtype=torch.bfloat16).uniform_(-0.0346, 0.0346, generator=g)]

    def ones(shape):
        return lambda: [torch.ones(shape, dtype=torch.bfloat16)]

    shapes = [('model.embed_tokens.weight', (a.vocab, a.d_model))]
    for i in range(depth):
        p = f'model.layers.{i}.'
        shapes += [(p + 'input_layernorm.weight', (a.d_model,)),
                   (p + 'self_attn.q_proj.weight', (a.heads * hd, a.d_model)),
                   (p + 'self_attn.k_proj.weight', (a.kv_heads * hd, a.d_model)),
                   (p + 'self_attn.v_proj.weight', (a.kv_heads * hd, a.d_model)),
                   (p + 'self_attn.o_proj.weight', (a.d_model, a.heads * hd)),
                   (p + 'post_attention_layernorm.weight', (a.d_model,)),
                   (p + 'mlp.gate_proj.weight', (a.ffn, a.d_model)),
                   (p + 'mlp.up_proj.weight', (a.ffn, a.d_model)),
                   (p + 'mlp.down_proj.weight', (a.d_model, a.ffn))]
    shapes += [('model.norm.weight', (a.d_model,)), ('lm_head.weight', (a.vocab, a.d_model))]
    jobs = [Job((TensorSpec(n, s, torch.bfloat16),), ones(s) if len(s) == 1 else rand(s)) for n, s in shapes]
    out.mkdir(parents=True)
    t = time.perf_counter()
    write_sharded(out, jobs, max_shard_bytes=2 * 2**30, desc='generating', progress=False)
    LlamaConfig(vocab_size=a.vocab, hidden_size=a.d_model, intermediate_size=a.ffn, num_hidden_layers=depth,
                num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, max_position_embeddings=8192,
                rope_theta=500000.0, torch_dtype='bfloat16', tie_word_embeddings=False).save_pretrained(str(out))
    return {'seconds': time.perf_counter() - t, 'peak_rss_mb': peak_rss_mb(), 'baseline_rss_mb': base,
            'bytes': sum(j.nbytes for j in jobs), 'files': len(list(out.glob('*.safetensors')))}


def child_import(a, src: Path, out: Path) -> dict:
    from foundry_upcycle.export.hf_import import import_hf_to_mixtral
    base = peak_rss_mb()
    t = time.perf_counter()
    r = import_hf_to_mixtral(src, out, num_experts=a.experts, top_k=a.top_k, shard_size_mb=a.shard_size_mb,
                             progress=False)
    seconds = time.perf_counter() - t
    peak = peak_rss_mb()
    return {'seconds': seconds, 'peak_rss_mb': peak, 'baseline_rss_mb': base, 'bytes_written': r.bytes_written,
            'bytes_read': r.bytes_read, 'shards': r.shards, 'tensors': r.tensors, 'verified': verify(src, out, a)}


def verify(src: Path, out: Path, a) -> bool:
    """Spot check: the last expert of the last layer is the dense MLP, byte for byte."""
    import torch
    from safetensors import safe_open
    cfg = json.loads((src / 'config.json').read_text())
    i = cfg['num_hidden_layers'] - 1

    def read(d: Path, name: str):
        index = json.loads((d / 'model.safetensors.index.json').read_text())['weight_map'] \
            if (d / 'model.safetensors.index.json').exists() else {name: 'model.safetensors'}
        with safe_open(str(d / index[name]), framework='pt') as f:
            return f.get_tensor(name)

    dense = read(src, f'model.layers.{i}.mlp.down_proj.weight')
    moe = read(out, f'model.layers.{i}.block_sparse_moe.experts.{a.experts - 1}.w2.weight')
    return bool(torch.equal(dense, moe))


def run_child(a, *args: str) -> dict:
    return _children.run_child(__file__, forward_args(a), *args)


def forward_args(a) -> list[str]:
    return [f'--d-model={a.d_model}', f'--ffn={a.ffn}', f'--heads={a.heads}', f'--kv-heads={a.kv_heads}',
            f'--vocab={a.vocab}', f'--experts={a.experts}', f'--top-k={a.top_k}', f'--shard-size-mb={a.shard_size_mb}']


# ---------------------------------------------------------------- driver

def pick_depths(a, depths: list[int], free: int) -> list[int]:
    fits = [d for d in depths if sum(sizes(a, d)) * 1.05 <= free]
    dropped = sorted(set(depths) - set(fits))
    if dropped:
        print(f'free disk {free / GB:.1f} GB: dropping depth(s) {dropped} (need '
              f'{", ".join(f"{sum(sizes(a, d)) / GB:.1f} GB" for d in dropped)})')
    if len(fits) < 2:
        largest = max((d for d in range(1, max(depths) + 1) if sum(sizes(a, d)) * 1.05 <= free), default=0)
        fits = sorted({max(1, largest // 2), largest}) if largest else []
        print(f'largest depth that fits: {largest}; running {fits}')
    return sorted(fits)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--layers', default='2,4', help='comma-separated depths (default 2,4)')
    p.add_argument('--d-model', type=int, default=4096)
    p.add_argument('--ffn', type=int, default=14336)
    p.add_argument('--heads', type=int, default=32)
    p.add_argument('--kv-heads', type=int, default=8)
    p.add_argument('--vocab', type=int, default=128256)
    p.add_argument('--experts', type=int, default=8)
    p.add_argument('--top-k', type=int, default=2)
    p.add_argument('--shard-size-mb', type=float, default=2048)
    p.add_argument('--workdir', default=tempfile.gettempdir(), help='where the temp dir goes (default /tmp)')
    p.add_argument('--child', nargs='+', help=argparse.SUPPRESS)
    a = p.parse_args()
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')

    if a.child:
        kind, *paths = a.child
        depth = int(paths[1]) if kind == 'generate' else 0
        result = (child_generate(a, depth, Path(paths[0])) if kind == 'generate'
                  else child_import(a, Path(paths[0]), Path(paths[1])))
        print(json.dumps(result))
        return 0

    depths = [int(x) for x in a.layers.split(',')]
    root = Path(tempfile.mkdtemp(prefix='import_scale_', dir=a.workdir))
    try:
        free = shutil.disk_usage(root).free
        print(f'width d={a.d_model} ffn={a.ffn} heads={a.heads}/{a.kv_heads} vocab={a.vocab}, {a.experts} experts; '
              f'free disk {free / GB:.1f} GB under {root}; cpus {os.cpu_count()}')
        rows = []
        for depth in pick_depths(a, depths, free):
            src, out = root / f'llama_{depth}', root / f'mixtral_{depth}'
            gen = run_child(a, 'generate', str(src), str(depth))
            imp = run_child(a, 'import', str(src), str(out))
            rows.append((depth, gen, imp))
            shutil.rmtree(src)
            shutil.rmtree(out)
            print(f'depth {depth}: generated {gen["bytes"] / GB:.2f} GB in {gen["files"]} files, '
                  f'{gen["seconds"]:.1f} s, peak RSS {gen["peak_rss_mb"]:.0f} MB | import wrote '
                  f'{imp["bytes_written"] / GB:.2f} GB in {imp["shards"]} shards, {imp["seconds"]:.1f} s, '
                  f'{imp["bytes_written"] / GB / imp["seconds"]:.2f} GB/s written '
                  f'({imp["bytes_read"] / GB / imp["seconds"]:.2f} GB/s read), peak RSS {imp["peak_rss_mb"]:.0f} MB '
                  f'(after imports {imp["baseline_rss_mb"]:.0f} MB), verified={imp["verified"]}', flush=True)
        print('\n| layers | source GB | output GB | import s | GB/s written | peak RSS MB (import) | '
              'peak RSS MB (generator) |')
        print('|---|---|---|---|---|---|---|')
        for depth, gen, imp in rows:
            print(f'| {depth} | {imp["bytes_read"] / GB:.2f} | {imp["bytes_written"] / GB:.2f} | '
                  f'{imp["seconds"]:.1f} | {imp["bytes_written"] / GB / imp["seconds"]:.2f} | '
                  f'{imp["peak_rss_mb"]:.0f} | {gen["peak_rss_mb"]:.0f} |')
        if len(rows) >= 2:
            (d0, _, i0), (d1, _, i1) = rows[0], rows[-1]
            growth = i1['peak_rss_mb'] - i0['peak_rss_mb']
            print(f'\npeak RSS {d0} -> {d1} layers: {growth:+.0f} MB '
                  f'({"flat" if abs(growth) < 0.1 * i0["peak_rss_mb"] else "GROWS with depth"}); '
                  f'one layer of output is {(sizes(a, 1)[1] - sizes(a, 0)[1]) / GB:.2f} GB')
        return 0 if all(i['verified'] for _, _, i in rows) else 1
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
    sys.exit(main())
