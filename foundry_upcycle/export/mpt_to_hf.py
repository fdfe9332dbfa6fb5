"""The MPT -> Hugging Face weight mapping (Llama / Mistral / Mixtral / DBRX names and layouts), as a plan of lazy
tensor jobs over an MPT source (any key prefix, e.g. Composer's `model.`).

Shapes: V vocab, D d_model, F ffn_hidden_size, E experts, H heads, KV kv heads, hd = D / H head dim.
  MPT   attn.Wqkv [(H + 2 KV) hd, D] (q, k, v stacked), ffn.experts.mlp.w1/v1/w2 [E F, D]
  Llama self_attn.q_proj [H hd, D], k_proj/v_proj [KV hd, D];  Mixtral experts.{e}.w1/w3 [F, D], w2 [D, F]
  DBRX  keeps MPT's fused Wqkv and [E F, D] expert tensors.
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping, Optional

import torch

from foundry_upcycle.export.mpt_arch import MPTArch
from foundry_upcycle.jobs import Job, MemorySource, TensorSpec, run_jobs
from foundry_upcycle.upcycle import MEGABLOCKS_TO_DENSE, MIXTRAL_EXPERT_NAMES

_BLOCK = re.compile(r'^transformer\.blocks\.(\d+)\.(.+)$')


def _strip_prefix(names: Iterable[str]) -> dict[str, str]:
    """{MPT name without the key prefix (Composer's `model.`) and fused-block `norm_attn_norm.` level: source name}."""
    names = list(names)
    anchors = [k for k in names if k.endswith('transformer.wte.weight')]
    if len(anchors) != 1:
        raise ValueError('checkpoint: no single `transformer.wte.weight` tensor; not an MPT state dict')
    prefix = anchors[0][:-len('transformer.wte.weight')]
    outside = sorted(k for k in names if not k.startswith(prefix))
    if outside:
        raise ValueError(f'checkpoint: tensors outside the model prefix {prefix!r}: {outside[:5]}')
    return {k[len(prefix):].replace('.norm_attn_norm.', '.'): k for k in names}


def _expected_mpt_keys(arch: MPTArch) -> list[str]:
    attn = ['attn.Wqkv.weight'] if arch.fused_qkv else ['attn.Wq.weight', 'attn.Wk.weight', 'attn.Wv.weight']
    ffn = (['ffn.router.layer.weight', 'ffn.experts.mlp.w1', 'ffn.experts.mlp.v1', 'ffn.experts.mlp.w2'] if arch.moe
           else ['ffn.gate_proj.weight', 'ffn.up_proj.weight', 'ffn.down_proj.weight'])
    keys = ['transformer.wte.weight', 'transformer.norm_f.weight'] + ([] if arch.tied else ['lm_head.weight'])
    for i in range(arch.n_layers):
        keys += [f'transformer.blocks.{i}.{k}' for k in ('norm_1.weight', *attn, 'attn.out_proj.weight',
                                                          'norm_2.weight', *ffn)]
    return keys


def _expected_shapes(arch: MPTArch) -> dict[str, tuple[int, ...]]:
    D, F, E, hd = arch.d_model, arch.ffn_hidden, arch.num_experts, arch.head_dim
    q, kv = arch.n_heads * hd, arch.kv_heads * hd
    per_layer = {
        'norm_1.weight': (D,), 'norm_2.weight': (D,), 'attn.Wqkv.weight': (q + 2 * kv, D), 'attn.Wq.weight': (q, D),
        'attn.Wk.weight': (kv, D), 'attn.Wv.weight': (kv, D), 'attn.out_proj.weight': (D, q),
        'ffn.router.layer.weight': (E, D), 'ffn.experts.mlp.w1': (E * F, D), 'ffn.experts.mlp.v1': (E * F, D),
        'ffn.experts.mlp.w2': (E * F, D), 'ffn.gate_proj.weight': (F, D), 'ffn.up_proj.weight': (F, D),
        'ffn.down_proj.weight': (D, F),
    }
    shapes = {}
    for key in _expected_mpt_keys(arch):
        m = _BLOCK.match(key)
        shapes[key] = per_layer[m[2]] if m else {'transformer.wte.weight': (arch.vocab_size, D),
                                                 'lm_head.weight': (arch.vocab_size, D),
                                                 'transformer.norm_f.weight': (D,)}[key]
    return shapes


def check_state_dict(shapes: Mapping[str, tuple[int, ...]], arch: MPTArch) -> None:
    """ValueError naming missing, unexpected (e.g. biases) or mis-shaped tensors. shapes: stripped name -> shape."""
    expected = _expected_shapes(arch)
    extra = sorted(set(shapes) - set(expected))
    missing = sorted(set(expected) - set(shapes))
    if extra or missing:
        hint = ' (biases: the targets hold none; set no_bias: true)' if any(k.endswith('.bias') for k in extra) else ''
        if any('.ffn.' in k for k in extra + missing):
            hint += ' (dense vs MoE FFN tensors: does the recipe match the checkpoint, e.g. its upcycle block?)'
        raise ValueError(f'checkpoint does not match the model config: unexpected {extra[:6]}, '
                         f'missing {missing[:6]}{hint}')
    for key, shape in expected.items():
        if tuple(shapes[key]) != shape:
            raise ValueError(f'checkpoint: {key} has shape {tuple(shapes[key])}, the model config gives {shape} '
                             '(check d_model, n_heads, kv_n_heads, ffn_hidden_size, vocab_size, moe_num_experts)')


class _Plan:
    """Builds the target's jobs; each job reads its MPT tensor(s) only when the writer asks for them."""

    def __init__(self, source, arch: MPTArch, dtype: Optional[torch.dtype]):
        self.source, self.arch, self.dtype = source, arch, dtype
        self.names = _strip_prefix(source.specs)
        check_state_dict({k: source.specs[v].shape for k, v in self.names.items()}, arch)
        self.jobs: list[Job] = []

    def out_dtype(self, mpt: str) -> torch.dtype:
        return self.dtype or self.source.specs[self.names[mpt]].dtype

    def read(self, mpt: str) -> torch.Tensor:
        """One MPT tensor on the CPU in the output dtype (one copy at most: the cast or the device move)."""
        t = self.source.read(self.names[mpt])
        return t.to(device='cpu', dtype=self.dtype or t.dtype)

    def add(self, outputs: list[tuple[str, tuple[int, ...]]], mpt: str, produce) -> None:
        specs = tuple(TensorSpec(name, shape, self.out_dtype(mpt)) for name, shape in outputs)
        self.jobs.append(Job(specs, lambda: [t.contiguous() for t in produce(self.read(mpt))]))

    def same(self, out: str, mpt: str) -> None:
        self.add([(out, _expected_shapes(self.arch)[mpt])], mpt, lambda t: [t])

    def qkv(self, pre: str, i: int, fused_out: Optional[str]) -> None:
        """Llama q/k/v projections, or DBRX's fused Wqkv (`fused_out`), from MPT's Wqkv or Wq/Wk/Wv."""
        a, mpt = self.arch, f'transformer.blocks.{i}.attn'
        q, kv = a.n_heads * a.head_dim, a.kv_heads * a.head_dim
        if a.fused_qkv and fused_out:
            self.same(fused_out, f'{mpt}.Wqkv.weight')
        elif a.fused_qkv:
            outs = [(f'{pre}.{n}_proj.weight', (rows, a.d_model)) for n, rows in (('q', q), ('k', kv), ('v', kv))]
            self.add(outs, f'{mpt}.Wqkv.weight', lambda t: t.split([q, kv, kv], dim=0))
        elif fused_out:  # unfused MPT -> DBRX's fused Wqkv: the one job that reads three tensors
            spec = TensorSpec(fused_out, (q + 2 * kv, a.d_model), self.out_dtype(f'{mpt}.Wq.weight'))
            self.jobs.append(Job((spec,), lambda: [torch.cat([self.read(f'{mpt}.W{n}.weight') for n in 'qkv'])]))
        else:
            for n in 'qkv':
                self.same(f'{pre}.{n}_proj.weight', f'{mpt}.W{n}.weight')

    def mixtral_experts(self, pre: str, i: int) -> None:
        """MPT [E F, D] expert tensors -> Mixtral's per-expert w1 / w3 [F, D] and w2 [D, F]."""
        E, F, D = self.arch.num_experts, self.arch.ffn_hidden, self.arch.d_model
        for mb, (dense_name, transposed) in MEGABLOCKS_TO_DENSE.items():
            w = MIXTRAL_EXPERT_NAMES[dense_name]
            outs = [(f'{pre}.experts.{e}.{w}.weight', (D, F) if transposed else (F, D)) for e in range(E)]
            # [E F, D] -> E x [F, D] (-> [D, F])
            self.add(outs, f'transformer.blocks.{i}.ffn.experts.mlp.{mb}',
                     lambda t, tr=transposed: [x.t() if tr else x for x in t.reshape(E, F, D)])


def plan_export(source, arch: MPTArch, target: str, dtype: Optional[torch.dtype] = None) -> list[Job]:
    """The target's tensors as lazy jobs over an MPT source (any key prefix), in model order."""
    p = _Plan(source, arch, dtype)
    dbrx = target == 'dbrx'
    p.same('transformer.wte.weight' if dbrx else 'model.embed_tokens.weight', 'transformer.wte.weight')
    for i in range(arch.n_layers):
        mpt = f'transformer.blocks.{i}'
        if dbrx:
            pre = f'transformer.blocks.{i}'
            p.same(f'{pre}.norm_attn_norm.norm_1.weight', f'{mpt}.norm_1.weight')
            p.qkv(pre, i, fused_out=f'{pre}.norm_attn_norm.attn.Wqkv.weight')
            p.same(f'{pre}.norm_attn_norm.attn.out_proj.weight', f'{mpt}.attn.out_proj.weight')
            p.same(f'{pre}.norm_attn_norm.norm_2.weight', f'{mpt}.norm_2.weight')
            p.same(f'{pre}.ffn.router.layer.weight', f'{mpt}.ffn.router.layer.weight')
            for n in MEGABLOCKS_TO_DENSE:  # DBRX keeps the [E F, D] layout of megablocks / torch_dmoe
                p.same(f'{pre}.ffn.experts.mlp.{n}', f'{mpt}.ffn.experts.mlp.{n}')
            continue
        pre = f'model.layers.{i}'
        p.same(f'{pre}.input_layernorm.weight', f'{mpt}.norm_1.weight')
        p.qkv(f'{pre}.self_attn', i, fused_out=None)
        p.same(f'{pre}.self_attn.o_proj.weight', f'{mpt}.attn.out_proj.weight')
        p.same(f'{pre}.post_attention_layernorm.weight', f'{mpt}.norm_2.weight')
        if arch.moe:
            p.same(f'{pre}.block_sparse_moe.gate.weight', f'{mpt}.ffn.router.layer.weight')
            p.mixtral_experts(f'{pre}.block_sparse_moe', i)
        else:
            for name in MIXTRAL_EXPERT_NAMES:
                p.same(f'{pre}.mlp.{name}.weight', f'{mpt}.ffn.{name}.weight')
    p.same('transformer.norm_f.weight' if dbrx else 'model.norm.weight', 'transformer.norm_f.weight')
    if not arch.tied:
        p.same('lm_head.weight', 'lm_head.weight')
    return p.jobs


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], arch: MPTArch, target: str,
                       dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """MPT state dict (any prefix) -> the target's HF state dict, all in memory (for tests and small models)."""
    return run_jobs(plan_export(MemorySource(state_dict), arch, target, dtype))
