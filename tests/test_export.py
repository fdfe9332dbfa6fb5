"""MPT -> Hugging Face export: logit parity (dense Llama/Mistral, MoE Mixtral, LayerNorm MoE DBRX), refusals,
generate on CPU, the CLI with a recipe's `upcycle:` block, and the `hf_moe_checkpointer` callback in a fit."""
from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')

from foundry_upcycle.export.hf_export import (ATTN_DEFAULTS, MPT_DEFAULTS, check_target, export_state_dict,
                                              resolve_model_config)

D, H, KV, L, V, F, E, K, S = 64, 4, 2, 2, 128, 96, 4, 2, 32
TOL = 1e-4
DENSE_FFN = {'ffn_type': 'mptglu', 'ffn_act_fn': {'name': 'silu'}, 'ffn_hidden_size': F}
MOE_FFN = {'ffn_type': 'torch_dmoe', 'moe_num_experts': E, 'moe_top_k': K, 'mlp_type': 'glu',
           'ffn_act_fn': {'name': 'silu'}, 'moe_normalize_expert_weights': 1, 'moe_jitter_eps': None,
           'uniform_expert_assignment': False, 'ffn_hidden_size': F}


def mpt_cfg(ffn=DENSE_FFN, norm='rmsnorm', tied=False, attn=None, **over):
    attn_config = {'attn_impl': 'torch', 'rope': True, 'rope_impl': 'hf', 'rope_theta': 5000.0,
                   'attn_type': 'grouped_query_attention', 'kv_n_heads': KV, **(attn or {})}
    cfg = dict(name='mpt_causal_lm', d_model=D, n_heads=H, n_layers=L, max_seq_len=S * 2, vocab_size=V,
               no_bias=True, attn_config=attn_config, norm_type=norm, ffn_config=copy.deepcopy(ffn),
               tie_word_embeddings=tied)
    cfg.update(over)
    return cfg


@pytest.fixture(scope='module')
def foundry():
    with warnings.catch_warnings():  # foundry's import-time warnings only; never a process-wide filter
        warnings.simplefilter('ignore')
        from llmfoundry.models.mpt import ComposerMPTCausalLM
    return ComposerMPTCausalLM


def build(foundry, cfg, seed=0):
    """A foundry MPT whose experts differ from each other and whose router is decisive, so routing matters."""
    torch.manual_seed(seed)
    kwargs = {k: v for k, v in copy.deepcopy(cfg).items() if k != 'name'}
    model = foundry(loss_fn='torch_crossentropy', **kwargs).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('router.layer.weight'):
                p.normal_(0, 0.5)
            elif 'experts.mlp' in name:
                p.add_(torch.randn_like(p) * p.std())  # per-expert perturbation: no longer copies
            elif p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)  # norm weights away from 1
    return model


def ids(batch=2, seq=S, seed=1):
    return torch.randint(0, V, (batch, seq), generator=torch.Generator().manual_seed(seed))


def hf_logits(path, x):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return model, model(x).logits


def max_diff(mpt, path, x=None):
    x = ids() if x is None else x
    with torch.no_grad():
        ref = mpt.model(input_ids=x).logits
    hf, got = hf_logits(path, x)
    return hf, (ref - got).abs().max().item()


PARITY = {
    'llama': (dict(), 'llama', 'LlamaForCausalLM'),
    'llama_tied': (dict(tied=True), 'auto', 'LlamaForCausalLM'),
    'llama_linear_rope': (dict(attn={'rope_hf_config': {'type': 'linear', 'factor': 2.0}}), 'llama',
                          'LlamaForCausalLM'),
    'mistral': (dict(attn={'attn_type': 'multihead_attention', 'kv_n_heads': None}), 'mistral', 'MistralForCausalLM'),
    'mixtral': (dict(ffn=MOE_FFN), 'auto', 'MixtralForCausalLM'),
    'mixtral_top1_mqa': (dict(ffn={**MOE_FFN, 'moe_top_k': 1}, attn={'attn_type': 'multiquery_attention',
                                                                     'kv_n_heads': None}), 'mixtral',
                         'MixtralForCausalLM'),
    'dbrx': (dict(ffn=MOE_FFN, norm='low_precision_layernorm', attn={'clip_qkv': 0.8}), 'auto', 'DbrxForCausalLM'),
}
# Exact on transformers only (vLLM's DBRX would apply SiLU and renormalise): exported with allow_inexact_engines.
TRANSFORMERS_ONLY = {
    'dbrx_gelu_unnormalised': (dict(ffn={**MOE_FFN, 'ffn_act_fn': {'name': 'gelu'}, 'moe_normalize_expert_weights': None},
                                    norm='low_precision_layernorm', attn={'clip_qkv': 0.8}), 'auto', 'DbrxForCausalLM'),
}


@pytest.mark.parametrize('case', sorted(PARITY) + sorted(TRANSFORMERS_ONLY))
def test_logit_parity(foundry, tmp_path, case):
    over, target, arch = {**PARITY, **TRANSFORMERS_ONLY}[case]
    cfg = mpt_cfg(**over)
    cfg['attn_config'] = {k: v for k, v in cfg['attn_config'].items() if v is not None}
    mpt = build(foundry, cfg)
    out = export_state_dict(mpt.state_dict(), cfg, tmp_path / 'hf', target=target, progress=False,
                            allow_inexact_engines=case in TRANSFORMERS_ONLY)
    engines = json.loads((out / 'engines.json').read_text())
    assert engines['exact_on'] == (['transformers'] if case in TRANSFORMERS_ONLY else ['transformers', 'vllm'])
    hf, diff = max_diff(mpt, out)
    print(f'{case}: {arch} max |logit diff| = {diff:.3g}')
    assert type(hf).__name__ == arch
    assert diff <= TOL
    if case == 'llama_linear_rope':
        assert hf.config.rope_scaling == {'rope_type': 'linear', 'factor': 2.0}
    if 'mixtral' in case or case == 'dbrx':
        # The experts differ, so routing changes the output: reversing the router's expert order must show.
        x = ids()
        with torch.no_grad():
            moe = hf.model.layers[0].block_sparse_moe.gate if 'mixtral' in case else None
            router = moe if moe is not None else hf.transformer.blocks[0].ffn.router.layer
            router.weight.copy_(router.weight.flip(0))
            assert (hf(x).logits - mpt.model(input_ids=x).logits).abs().max().item() > 1e-2


def test_upcycled_recipe_via_cli_and_generate(foundry, tmp_path):
    """A dense recipe with an `upcycle:` block + a Composer checkpoint -> Mixtral via the CLI; generate on CPU."""
    from omegaconf import OmegaConf
    from foundry_upcycle.checkpoint_io import save_composer_weights
    from foundry_upcycle.export.cli import register

    dense = mpt_cfg(name='mpt_upcycle_causal_lm')
    upcycle = {'num_experts': E, 'top_k': K, 'router_init_std': 0.02}
    moe_cfg = resolve_model_config(dense, upcycle)
    assert moe_cfg['ffn_config']['ffn_type'] == 'torch_dmoe'
    mpt = build(foundry, moe_cfg)
    save_composer_weights(mpt.state_dict(), str(tmp_path / 'ep0-ba4-rank0.pt'))
    OmegaConf.save({'variables': {'d': D}, 'model': {**dense, 'd_model': '${variables.d}'}, 'upcycle': upcycle},
                   tmp_path / 'recipe.yaml')
    tok = tiny_tokenizer(tmp_path / 'tok')

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(['export', '--checkpoint', str(tmp_path / 'ep0-ba4-rank0.pt'), '--config',
                              str(tmp_path / 'recipe.yaml'), '--out', str(tmp_path / 'hf'), '--tokenizer', str(tok)])
    assert args.func(args) == 0
    hf, diff = max_diff(mpt, tmp_path / 'hf')
    print(f'recipe+upcycle block via CLI: {type(hf).__name__} max |logit diff| = {diff:.3g}')
    assert type(hf).__name__ == 'MixtralForCausalLM' and diff <= TOL
    assert (tmp_path / 'hf' / 'tokenizer.json').is_file()

    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / 'hf'))
    assert hf.config.eos_token_id == tokenizer.eos_token_id
    prompt = tokenizer('w1 w2 w3 w4', return_tensors='pt')['input_ids']
    new = 6
    gen = hf.generate(prompt, max_new_tokens=new, do_sample=False, min_new_tokens=new)
    assert gen.shape == (1, prompt.shape[1] + new)
    seq = prompt  # greedy decoding with the foundry model must pick the same tokens
    with torch.no_grad():
        for _ in range(new):
            seq = torch.cat([seq, mpt.model(input_ids=seq).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(gen, seq)
    assert isinstance(tokenizer.decode(gen[0]), str)

    # The output directory is never overwritten silently; --overwrite replaces it whole.
    with pytest.raises(ValueError, match='not empty'):
        args.func(args)
    (tmp_path / 'hf' / 'stale.txt').write_text('from an older export')
    args = parser.parse_args(['export', '--checkpoint', str(tmp_path / 'ep0-ba4-rank0.pt'), '--config',
                              str(tmp_path / 'recipe.yaml'), '--out', str(tmp_path / 'hf'), '--overwrite',
                              '--dtype', 'bf16'])
    assert args.func(args) == 0
    assert not (tmp_path / 'hf' / 'stale.txt').exists() and not list(tmp_path.glob('.hf.*'))
    from safetensors import safe_open
    assert json.loads((tmp_path / 'hf' / 'config.json').read_text())['torch_dtype'] == 'bfloat16'
    with safe_open(str(tmp_path / 'hf' / 'model.safetensors'), framework='pt') as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {'BF16'}


def tiny_tokenizer(out: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {'<eos>': 0, '<unk>': 1, **{f'w{i}': i + 2 for i in range(60)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token='<eos>', unk_token='<unk>').save_pretrained(str(out))
    return out


REFUSALS = [
    (dict(no_bias=False), 'auto', 'model.no_bias'),
    (dict(attn={'alibi': True, 'rope': False}), 'auto', 'attn_config.alibi'),
    (dict(attn={'rope': False}), 'auto', 'learned_pos_emb'),
    (dict(ffn=MOE_FFN, norm='layernorm', tied=True), 'dbrx', 'tie_word_embeddings'),
    (dict(ffn={**DENSE_FFN, 'ffn_act_fn': {'name': 'gelu'}}), 'llama', 'ffn_config.ffn_act_fn'),
    (dict(ffn={**MOE_FFN, 'ffn_act_fn': {'name': 'gelu', 'approximate': 'tanh'}}), 'mixtral', 'ffn_config.ffn_act_fn'),
    (dict(ffn={**MOE_FFN, 'moe_normalize_expert_weights': None}), 'mixtral', 'moe_normalize_expert_weights'),
    (dict(ffn={**MOE_FFN, 'moe_jitter_eps': 0.01}), 'mixtral', 'ffn_config.moe_jitter_eps'),
    (dict(ffn={**MOE_FFN, 'uniform_expert_assignment': True}), 'auto', 'uniform_expert_assignment'),
    (dict(ffn={**MOE_FFN, 'mlp_type': 'mlp'}), 'auto', 'ffn_config.mlp_type'),
    (dict(ffn={'ffn_type': 'mptmlp', 'ffn_hidden_size': F}), 'llama', 'ffn_config.ffn_type'),
    (dict(ffn=MOE_FFN), 'llama', 'ffn_config.ffn_type'),
    (dict(), 'mixtral', 'ffn_config.ffn_type'),
    (dict(norm='layernorm'), 'auto', 'model.norm_type'),
    (dict(ffn=MOE_FFN, norm='layernorm', norm_eps=1e-6), 'dbrx', 'model.norm_eps'),
    (dict(attn={'qk_ln': True}), 'auto', 'attn_config.qk_ln'),
    (dict(attn={'clip_qkv': 6.0}), 'llama', 'attn_config.clip_qkv'),
    (dict(attn={'sliding_window_size': 16}), 'mistral', 'attn_config.sliding_window_size'),
    (dict(logit_scale='inv_sqrt_d_model'), 'auto', 'model.logit_scale'),
    (dict(attention_bias=True), 'auto', 'model.attention_bias'),
    (dict(ffn=MOE_FFN, norm='layernorm', attn={'rope_hf_config': {'type': 'linear', 'factor': 2.0}}), 'dbrx',
     'rope_hf_config'),
]


@pytest.mark.parametrize('over,target,key', REFUSALS, ids=[r[2] + '-' + r[1] for r in REFUSALS])
def test_refuses_what_the_target_cannot_represent(over, target, key):
    with pytest.raises(ValueError, match=key.replace('.', r'\.')):
        check_target(mpt_cfg(**over), target)


def test_refusal_lists_every_problem_and_bad_target():
    cfg = mpt_cfg(ffn={**MOE_FFN, 'moe_normalize_expert_weights': None, 'moe_jitter_eps': 0.1}, no_bias=False)
    with pytest.raises(ValueError) as e:
        check_target(cfg, 'mixtral')
    for key in ('no_bias', 'moe_normalize_expert_weights', 'moe_jitter_eps'):
        assert key in str(e.value)
    with pytest.raises(ValueError, match='target'):
        check_target(mpt_cfg(), 'gpt2')


def test_checkpoint_must_match_recipe(foundry, tmp_path):
    dense = build(foundry, mpt_cfg())
    with pytest.raises(ValueError, match='upcycle block'):
        export_state_dict(dense.state_dict(), mpt_cfg(), tmp_path / 'x', upcycle={'num_experts': E}, progress=False)
    assert not (tmp_path / 'x').exists()
    sd = dict(dense.state_dict())
    sd['model.transformer.blocks.0.attn.out_proj.bias'] = torch.zeros(D)
    with pytest.raises(ValueError, match='bias'):
        export_state_dict(sd, mpt_cfg(), tmp_path / 'y', progress=False)
    assert not (tmp_path / 'y').exists() and not list(tmp_path.glob('.y.*'))


def test_defaults_mirror_llmfoundry(foundry):
    from llmfoundry.models.mpt import MPTConfig
    from llmfoundry.models.utils.config_defaults import attn_config_defaults
    params = inspect.signature(MPTConfig.__init__).parameters
    assert {k: params[k].default for k in MPT_DEFAULTS} == MPT_DEFAULTS
    assert {k: attn_config_defaults[k] for k in ATTN_DEFAULTS} == ATTN_DEFAULTS


def test_callback_exports_during_fit(foundry, tmp_path):
    from composer import Trainer
    from torch.utils.data import DataLoader
    from foundry_upcycle.export.callback import HFExportCheckpointer

    from llmfoundry.utils.builders import build_callback
    built = build_callback('hf_moe_checkpointer', {'save_folder': str(tmp_path), 'save_interval': '2ba'})
    assert isinstance(built, HFExportCheckpointer)  # the entry point foundry's YAML `callbacks:` block uses

    cfg = mpt_cfg(ffn=MOE_FFN)
    model = build(foundry, cfg).train()
    data = [{'input_ids': t, 'labels': t.clone()} for t in ids(16, S, seed=3)]
    loader = DataLoader(data, batch_size=4)
    callback = HFExportCheckpointer(save_folder=str(tmp_path / '{run_name}'), save_interval=2)
    trainer = Trainer(model=model, train_dataloader=loader, max_duration='3ba', callbacks=[callback], device='cpu',
                      precision='fp32', run_name='tiny', progress_bar=False, log_to_console=False,
                      optimizers=torch.optim.SGD(model.parameters(), lr=0.1))
    assert callback.resolved_target == 'mixtral'
    trainer.fit()
    assert sorted(p.name for p in (tmp_path / 'tiny').iterdir()) == ['ba2', 'ba3']  # interval + end of fit
    model.eval()
    hf, diff = max_diff(model, tmp_path / 'tiny' / 'ba3')
    print(f'callback export after fit: max |logit diff| = {diff:.3g}')
    assert type(hf).__name__ == 'MixtralForCausalLM' and diff <= TOL
    _, before = max_diff(model, tmp_path / 'tiny' / 'ba2')
    assert before > 1e-3  # the ba2 export holds the weights of batch 2, not the final ones
    trainer.close()

    bad = HFExportCheckpointer(save_folder=str(tmp_path / 'bad'), save_interval='1ba', target='llama')
    with pytest.raises(ValueError, match='ffn_config.ffn_type'):
        Trainer(model=model, train_dataloader=loader, max_duration='1ba', callbacks=[bad], device='cpu',
                precision='fp32', progress_bar=False, optimizers=torch.optim.SGD(model.parameters(), lr=0.1))
    assert not (tmp_path / 'bad').exists()
    with pytest.raises(ValueError, match='save_interval'):
        HFExportCheckpointer(save_folder=str(tmp_path), save_interval='sometimes')


# ------------------------------------------------------------------ engines, dail rope, mb_dmoe, bf16, shards

VLLM_INEXACT = [
    (dict(ffn={**MOE_FFN, 'ffn_act_fn': {'name': 'gelu'}}, norm='layernorm'), 'dbrx', 'ffn_config.ffn_act_fn'),
    (dict(ffn={**MOE_FFN, 'moe_normalize_expert_weights': None}, norm='layernorm'), 'dbrx',
     'ffn_config.moe_normalize_expert_weights'),
    (dict(ffn=MOE_FFN, attn={'rope_hf_config': {'type': 'linear', 'factor': 2.0}}), 'mixtral',
     'attn_config.rope_hf_config'),
]


@pytest.mark.parametrize('over,target,key', VLLM_INEXACT, ids=[r[2] for r in VLLM_INEXACT])
def test_refuses_exports_vllm_would_compute_differently(foundry, tmp_path, over, target, key, caplog):
    """Defect 5: such exports load in vLLM and silently serve another function; refused by name unless asked."""
    cfg = mpt_cfg(**over)
    mpt = build(foundry, cfg)
    with pytest.raises(ValueError, match=r'vLLM.*\n.*model\.' + key.replace('.', r'\.')):
        export_state_dict(mpt.state_dict(), cfg, tmp_path / 'hf', target=target, progress=False)
    assert not (tmp_path / 'hf').exists()
    with caplog.at_level('WARNING'):
        out = export_state_dict(mpt.state_dict(), cfg, tmp_path / 'hf', target=target, progress=False,
                                allow_inexact_engines=True)
    assert key in caplog.text
    engines = json.loads((out / 'engines.json').read_text())
    assert engines['exact_on'] == ['transformers'] and key in engines['not_exact_on']['vllm']


class ReferenceDAILRotary(torch.nn.Module):
    """flash_attn.layers.rotary.RotaryEmbedding (interleaved=False, no xpos) in plain torch, written from the
    flash-attn 2.x source: inv_freq = base^(-2i/d) in fp32, positions from seqlen_offset, GPT-NeoX (rotate-half)
    pairing; rotates q and the k half of kv. flash-attn's triton kernel does not run on CPU, so this stands in."""

    def __init__(self, dim, base=10000.0, interleaved=False, scale_base=None, pos_idx_in_fp32=True, device=None):
        super().__init__()
        assert not interleaved and scale_base is None
        self.register_buffer('inv_freq', 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)),
                             persistent=False)

    def _rotate(self, x, offset):  # x [B, S, H, hd]
        t = torch.arange(offset, offset + x.shape[1], dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq)
        cos = torch.cat([freqs.cos()] * 2, -1)[None, :, None].to(x.dtype)
        sin = torch.cat([freqs.sin()] * 2, -1)[None, :, None].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    def forward(self, q, kv, seqlen_offset=0, max_seqlen=None):  # kv [B, S, 2, KV, hd]
        return self._rotate(q, seqlen_offset), torch.stack([self._rotate(kv[:, :, 0], seqlen_offset), kv[:, :, 1]], 2)


def test_parity_with_rope_impl_dail(foundry, tmp_path, monkeypatch):
    """MPT's default rope (flash-attn's rotary, used on GPU) exports to the same Mixtral as rope_impl hf."""
    from llmfoundry.models.mpt import configuration_mpt, modeling_mpt
    monkeypatch.setattr(modeling_mpt, 'DAILRotaryEmbedding', ReferenceDAILRotary, raising=False)
    monkeypatch.setattr(configuration_mpt, 'is_flash_v2_installed', lambda v2_version='2.0.0': True)
    cfg = mpt_cfg(ffn=MOE_FFN, attn={'rope_impl': 'dail'})
    mpt = build(foundry, cfg)
    assert isinstance(mpt.model.transformer.rotary_embedding, ReferenceDAILRotary)
    out = export_state_dict(mpt.state_dict(), cfg, tmp_path / 'hf', progress=False)
    hf, diff = max_diff(mpt, out)
    print(f'rope_impl dail (reference rotary) -> Mixtral: max |logit diff| = {diff:.3g}')
    assert diff <= TOL
    hf_rope = build(foundry, mpt_cfg(ffn=MOE_FFN))  # same seed, same weights, rope_impl hf
    with torch.no_grad():
        x = ids()
        assert (hf_rope.model(input_ids=x).logits - mpt.model(input_ids=x).logits).abs().max() <= TOL


def test_mb_dmoe_config_exports_where_the_target_can_represent_it(foundry, tmp_path):
    """An mb_dmoe recipe (megablocks: tanh-GELU unless ffn_act_fn says otherwise) shares torch_dmoe's tensors.
    Its default activation has no Mixtral equivalent (refused); DBRX in transformers computes it; with SiLU
    set explicitly it is an exact Mixtral."""
    mb = {**MOE_FFN, 'ffn_type': 'mb_dmoe', 'moe_world_size': 1, 'mlp_impl': 'grouped', 'moe_loss_weight': 0.01}
    mb.pop('ffn_act_fn')
    with pytest.raises(ValueError, match='ffn_act_fn'):
        check_target(mpt_cfg(ffn=mb), 'mixtral')
    tanh = build(foundry, mpt_cfg(ffn={**MOE_FFN, 'ffn_act_fn': {'name': 'gelu', 'approximate': 'tanh'}},
                                  norm='layernorm'))
    out = export_state_dict(tanh.state_dict(), mpt_cfg(ffn=mb, norm='layernorm'), tmp_path / 'dbrx', progress=False,
                            allow_inexact_engines=True)
    hf, diff = max_diff(tanh, out)
    assert type(hf).__name__ == 'DbrxForCausalLM' and diff <= TOL
    silu = build(foundry, mpt_cfg(ffn=MOE_FFN))
    out = export_state_dict(silu.state_dict(), mpt_cfg(ffn={**mb, 'ffn_act_fn': {'name': 'silu'}}),
                            tmp_path / 'mixtral', progress=False)
    hf, diff = max_diff(silu, out)
    assert type(hf).__name__ == 'MixtralForCausalLM' and diff <= TOL


def test_bf16_export_parity_and_sharding_with_index(foundry, tmp_path):
    from safetensors import safe_open
    cfg = mpt_cfg(ffn=MOE_FFN)
    mpt = build(foundry, cfg)
    out = export_state_dict(mpt.state_dict(), cfg, tmp_path / 'hf', dtype=torch.bfloat16, max_shard_bytes=40_000,
                            progress=False)
    index = json.loads((out / 'model.safetensors.index.json').read_text())
    shards = sorted(p.name for p in out.glob('*.safetensors'))
    assert len(shards) >= 3 and sorted(set(index['weight_map'].values())) == shards
    sizes, names = 0, set()
    for shard in shards:
        with safe_open(str(out / shard), framework='pt') as f:
            for k in f.keys():
                t = f.get_tensor(k)
                assert t.dtype == torch.bfloat16 and index['weight_map'][k] == shard
                sizes += t.numel() * 2
                names.add(k)
    assert names == set(index['weight_map']) and index['metadata']['total_size'] == sizes
    with torch.no_grad():  # the reference: the same model with its weights rounded to bf16
        for p in mpt.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    hf, diff = max_diff(mpt, out)
    print(f'bf16 export: max |logit diff| vs bf16-rounded MPT = {diff:.3g}')
    assert diff <= TOL


def test_export_checkpoint_streams_from_mmap_and_safetensors(foundry, tmp_path):
    """A Composer checkpoint with optimizer state is memory-mapped (the state is never read) and both it and a
    safetensors file export to the same tensors as the in-memory path."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file
    from foundry_upcycle.export.hf_export import export_checkpoint
    cfg = mpt_cfg(ffn=MOE_FFN)
    mpt = build(foundry, cfg)
    sd = mpt.state_dict()
    torch.save({'state': {'model': sd, 'optimizers': {'adam': {k: torch.zeros_like(v) for k, v in sd.items()}}}},
               tmp_path / 'ckpt.pt')
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / 'w.safetensors'))
    OmegaConf.save({'model': cfg}, tmp_path / 'recipe.yaml')
    for name in ('ckpt.pt', 'w.safetensors'):
        out = export_checkpoint(str(tmp_path / name), str(tmp_path / 'recipe.yaml'), str(tmp_path / f'hf-{name}'),
                                progress=False)
        _, diff = max_diff(mpt, out)
        assert diff <= TOL


def test_export_converts_lazily_one_job_at_a_time(foundry, tmp_path, monkeypatch):
    """Defect 6: the writer receives jobs that read and cast their tensors when written, not a converted copy of
    the whole model made up front (which also held a second full copy when casting)."""
    from foundry_upcycle.export import hf_export
    cfg = mpt_cfg(ffn=MOE_FFN)
    mpt = build(foundry, cfg)
    seen = {}
    real = hf_export.write_sharded

    def spy(out, jobs, *args, **kwargs):
        seen['jobs'] = jobs
        return real(out, jobs, *args, **kwargs)

    monkeypatch.setattr(hf_export, 'write_sharded', spy)
    export_state_dict(mpt.state_dict(), cfg, tmp_path / 'hf', dtype=torch.bfloat16, progress=False)
    jobs = seen['jobs']
    assert len(jobs) < sum(len(j.specs) for j in jobs)  # a layer's experts come from one job (one MPT tensor)
    for job in jobs[:6]:
        first, second = job.produce(), job.produce()
        assert all(a is not b and torch.equal(a, b) for a, b in zip(first, second))  # made on demand


def test_callback_reads_weights_on_rank_zero_only(foundry, tmp_path, monkeypatch):
    """Defect 6: without FSDP, ranks other than 0 neither copy the state dict nor export."""
    from types import SimpleNamespace
    from foundry_upcycle.export import callback as cb
    model = build(foundry, mpt_cfg(ffn=MOE_FFN))
    calls = []
    real_state_dict = model.state_dict
    monkeypatch.setattr(model, 'state_dict', lambda *a, **k: calls.append(1) or real_state_dict(*a, **k))
    state = SimpleNamespace(fsdp_enabled=False, model=model, run_name='r',
                            timestamp=SimpleNamespace(batch=3))
    hook = cb.HFExportCheckpointer(save_folder=str(tmp_path / '{run_name}'), save_interval=1)
    hook.resolved_target = 'mixtral'
    monkeypatch.setattr(cb.dist, 'get_global_rank', lambda: 1)
    hook._export(state)
    assert calls == [] and not (tmp_path / 'r').exists()
    monkeypatch.setattr(cb.dist, 'get_global_rank', lambda: 0)
    hook._last_batch = -1
    hook._export(state)
    assert calls == [1] and (tmp_path / 'r' / 'ba3' / 'config.json').is_file()
