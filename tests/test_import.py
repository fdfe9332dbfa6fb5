"""Dense HF Llama/Mistral -> Mixtral import: step-0 logit parity, config for foundry's hf_causal_lm (load-balancing
loss on), streaming into shards, and kill-safety (exception and SIGKILL mid-way; a rerun succeeds)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')

from foundry_upcycle.export import writer
from foundry_upcycle.export.hf_import import import_hf_to_mixtral

E, K, V, D, F, S = 4, 2, 100, 64, 96, 40
TOL = 1e-4


def tiny_tokenizer(out: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {'<eos>': 0, '<unk>': 1, '<pad>': 2, **{f'w{i}': i + 3 for i in range(60)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token='<eos>', unk_token='<unk>',
                            pad_token='<pad>').save_pretrained(str(out))
    return out


def save_dense(out: Path, model_type='llama', dtype=torch.float32, max_shard_size='60KB', **over):
    """A random tiny dense model saved as (sharded) safetensors with a tokenizer; returns the model."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
    config_cls, model_cls = {'llama': (LlamaConfig, LlamaForCausalLM),
                             'mistral': (MistralConfig, MistralForCausalLM)}[model_type]
    cfg = config_cls(**{'hidden_size': D, 'intermediate_size': F, 'num_hidden_layers': 3, 'num_attention_heads': 4,
                        'num_key_value_heads': 2, 'max_position_embeddings': 64, 'rope_theta': 5000.0,
                        'bos_token_id': 0, 'eos_token_id': 0, 'pad_token_id': 2, 'vocab_size': V, **over})
    torch.manual_seed(0)
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.to(dtype).save_pretrained(str(out), max_shard_size=max_shard_size, safe_serialization=True)
    tiny_tokenizer(out)
    return model


@pytest.fixture(scope='module')
def dense(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    src = tmp_path_factory.mktemp('dense') / 'llama'
    model = save_dense(src)
    assert (src / 'model.safetensors.index.json').is_file() and len(list(src.glob('*.safetensors'))) >= 2
    return src, model


def logits(path_or_model, x):
    from transformers import AutoModelForCausalLM
    model = path_or_model
    if isinstance(path_or_model, (str, Path)):
        model = AutoModelForCausalLM.from_pretrained(str(path_or_model), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return model, model.float()(x).logits


def ids(batch=2, seq=S):
    return torch.randint(3, V, (batch, seq), generator=torch.Generator().manual_seed(1))


def test_import_gives_dense_logits_and_trainable_config(dense, tmp_path):
    from safetensors import safe_open
    from foundry_upcycle.weights import UpcycleWeights, router_weight
    src, model = dense
    result = import_hf_to_mixtral(src, tmp_path / 'moe', num_experts=E, top_k=K, shard_size_mb=0.15, progress=False)
    out = result.path
    assert result.shards >= 2 and (out / 'model.safetensors.index.json').is_file()
    assert {'tokenizer.json', 'tokenizer_config.json', 'generation_config.json'} <= {p.name for p in out.iterdir()}
    cfg = json.loads((out / 'config.json').read_text())
    assert cfg['model_type'] == 'mixtral' and cfg['architectures'] == ['MixtralForCausalLM']
    assert (cfg['num_local_experts'], cfg['num_experts_per_tok']) == (E, K)
    assert cfg['output_router_logits'] is False and cfg['router_aux_loss_coef'] == 0.01  # serving config
    engines = json.loads((out / 'engines.json').read_text())
    assert engines['exact_on'] == ['transformers', 'vllm'] and engines['vllm_top_k_key'] == 'num_experts_per_tok'
    assert cfg['router_jitter_noise'] == 0

    x = ids()
    mixtral, got = logits(out, x)
    _, ref = logits(model, x)
    diff = (got - ref).abs().max().item()
    print(f'imported Llama -> Mixtral step-0 max |logit diff| = {diff:.3g}')
    assert diff <= TOL

    # Experts are copies of the dense MLP; each router comes from its own (seed, layer) stream.
    dense_mlp, moe = model.model.layers[1].mlp, mixtral.model.layers[1].block_sparse_moe
    for e in range(E):
        assert torch.equal(moe.experts[e].w1.weight, dense_mlp.gate_proj.weight)
        assert torch.equal(moe.experts[e].w3.weight, dense_mlp.up_proj.weight)
        assert torch.equal(moe.experts[e].w2.weight, dense_mlp.down_proj.weight)
    assert torch.equal(moe.gate.weight, router_weight(UpcycleWeights(E, 0.02, seed=0), 1, D))

    # Training turns the router logits on (yamls/hf/mixtral.yaml does it through config_overrides): then the loss
    # is cross-entropy + 0.01 * aux loss.
    out_train = mixtral(x, labels=x, output_router_logits=True)
    ce = torch.nn.functional.cross_entropy(out_train.logits[:, :-1].reshape(-1, V), x[:, 1:].reshape(-1))
    assert out_train.aux_loss > 0
    torch.testing.assert_close(out_train.loss, ce + 0.01 * out_train.aux_loss)

    # Shards were written one job at a time and are valid safetensors with the planned names.
    index = json.loads((out / 'model.safetensors.index.json').read_text())
    for name, file in list(index['weight_map'].items())[:5]:
        with safe_open(str(out / file), framework='pt') as f:
            assert name in f.keys()


def test_bf16_tied_mistral_with_rope_scaling(tmp_path):
    src = tmp_path / 'mistral'
    model = save_dense(src, model_type='mistral', dtype=torch.bfloat16, max_shard_size='10MB',
                       tie_word_embeddings=True, rope_scaling={'rope_type': 'linear', 'factor': 2.0})
    assert (src / 'model.safetensors').is_file()
    out = import_hf_to_mixtral(src, tmp_path / 'moe', num_experts=E, top_k=K, seed=3, progress=False).path
    cfg = json.loads((out / 'config.json').read_text())
    assert cfg['tie_word_embeddings'] is True and cfg['torch_dtype'] == 'bfloat16'
    assert cfg['rope_scaling'] == {'rope_type': 'linear', 'factor': 2.0}
    from safetensors import safe_open
    with safe_open(str(out / 'model.safetensors'), framework='pt') as f:
        assert 'lm_head.weight' not in f.keys()
        assert f.get_slice('model.layers.0.block_sparse_moe.experts.0.w1.weight').get_dtype() == 'BF16'
    x = ids()
    _, ref = logits(model.to(torch.bfloat16), x)  # bf16 weights compared in fp32
    _, got = logits(out, x)
    assert (got - ref).abs().max().item() <= TOL


def test_exception_mid_way_leaves_no_output_and_rerun_succeeds(dense, tmp_path, monkeypatch):
    src, _ = dense
    real = writer.write_safetensors_stream
    calls = []

    def fail_after_first_shard(*args, **kwargs):
        if calls:
            raise RuntimeError('disk on fire')
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(writer, 'write_safetensors_stream', fail_after_first_shard)
    with pytest.raises(RuntimeError, match='disk on fire'):
        import_hf_to_mixtral(src, tmp_path / 'moe', num_experts=E, shard_size_mb=0.15, progress=False)
    # The first shard was written inside a hidden temp dir beside the target, which the failure removed.
    assert calls and calls[0].parent.parent == tmp_path and calls[0].parent.name.startswith('.moe.hf-import-tmp-')
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(writer, 'write_safetensors_stream', real)
    result = import_hf_to_mixtral(src, tmp_path / 'moe', num_experts=E, shard_size_mb=0.15, progress=False)
    assert result.shards >= 2 and [p.name for p in tmp_path.iterdir()] == ['moe']


def test_sigkill_mid_way_leaves_no_output_and_rerun_cleans_up(dense, tmp_path):
    """A real kill (no Python cleanup): only a hidden temp dir remains; the next run removes it and succeeds."""
    src, _ = dense
    script = textwrap.dedent(f"""
        import os, signal
        from foundry_upcycle.export import writer
        from foundry_upcycle.export.hf_import import import_hf_to_mixtral
        real, n = writer.write_safetensors_stream, []
        def write_then_die(path, *a, **k):
            real(path, *a, **k)
            n.append(path)
            if len(n) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        writer.write_safetensors_stream = write_then_die
        import_hf_to_mixtral({str(src)!r}, {str(tmp_path / 'moe')!r}, num_experts={E}, shard_size_mb=0.15,
                             progress=False)
    """)
    proc = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'PYTHONWARNINGS': 'ignore'})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    left = list(tmp_path.iterdir())
    assert not (tmp_path / 'moe').exists()
    assert len(left) == 1 and left[0].name.startswith('.moe.hf-import-tmp-')
    assert len(list(left[0].glob('*.safetensors'))) == 2 and not (left[0] / 'config.json').exists()
    import_hf_to_mixtral(src, tmp_path / 'moe', num_experts=E, shard_size_mb=0.15, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ['moe'] and (tmp_path / 'moe' / 'config.json').is_file()


def test_refusals(dense, tmp_path):
    src, _ = dense
    with pytest.raises(ValueError, match='num_experts'):
        import_hf_to_mixtral(src, tmp_path / 'a', num_experts=1)
    with pytest.raises(ValueError, match='top_k'):
        import_hf_to_mixtral(src, tmp_path / 'a', num_experts=4, top_k=5)
    (tmp_path / 'full').mkdir()
    (tmp_path / 'full' / 'x').write_text('keep me')
    with pytest.raises(ValueError, match='not empty'):
        import_hf_to_mixtral(src, tmp_path / 'full', num_experts=E, progress=False)
    assert (tmp_path / 'full' / 'x').read_text() == 'keep me'

    biased = tmp_path / 'biased'
    save_dense(biased, attention_bias=True)
    with pytest.raises(ValueError, match='attention_bias'):
        import_hf_to_mixtral(biased, tmp_path / 'b', num_experts=E, progress=False)
    bad = tmp_path / 'gpt2'
    bad.mkdir()
    (bad / 'config.json').write_text(json.dumps({'model_type': 'gpt2'}))
    (bad / 'pytorch_model.bin').write_bytes(b'')
    with pytest.raises(ValueError, match='safetensors'):
        import_hf_to_mixtral(bad, tmp_path / 'c', num_experts=E, progress=False)
    (bad / 'model.safetensors').write_bytes(open(next(src.glob('model-00001-*.safetensors')), 'rb').read())
    with pytest.raises(ValueError, match='model_type'):
        import_hf_to_mixtral(bad, tmp_path / 'c', num_experts=E, progress=False)
    assert not any(p.name in ('a', 'b', 'c') for p in tmp_path.iterdir())


def test_cli_import_hf(dense, tmp_path):
    import argparse
    from foundry_upcycle.export.cli import register
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(['import-hf', '--src', str(dense[0]), '--out', str(tmp_path / 'moe'), '--num-experts',
                              '4', '--top-k', '1', '--load-balancing-loss-weight', '0.02', '--seed', '7'])
    assert args.func(args) == 0
    cfg = json.loads((tmp_path / 'moe' / 'config.json').read_text())
    assert (cfg['num_local_experts'], cfg['num_experts_per_tok'], cfg['router_aux_loss_coef']) == (4, 1, 0.02)


def test_imported_mixtral_generates_with_kv_cache(dense, tmp_path):
    """Defect 1: saved with output_router_logits true, transformers 4.51's Mixtral computed the aux loss on every
    decode step and generate raised (size of tensor a (4) must match ... (0)). The import must serve."""
    src, model = dense
    out = import_hf_to_mixtral(src, tmp_path / 'moe', num_experts=E, top_k=K, progress=False).path
    from transformers import AutoModelForCausalLM
    mixtral = AutoModelForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32).eval()
    prompt = ids(batch=2, seq=8)
    got = mixtral.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, min_new_tokens=6,
                           do_sample=False, use_cache=True)
    ref = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, min_new_tokens=6,
                         do_sample=False, use_cache=True)
    assert torch.equal(got, ref)  # the fresh upcycle is the dense model's function, token for token


@pytest.mark.slow
def test_shipped_hf_recipe_trains_the_import_with_lbl(corpus, tmp_path):
    """yamls/hf/mixtral.yaml under foundry's own train(): hf_causal_lm loads the import, the recipe turns the router
    logits on, and the training loss is CE + coef * load-balancing loss (it would be CE alone without the recipe)."""
    import copy
    from conftest import YAMLS, run_train
    from omegaconf import OmegaConf as om
    src = tmp_path / 'dense'
    save_dense(src, vocab_size=264, max_shard_size='10MB')  # >= the corpus tokenizer's 258 tokens
    out = import_hf_to_mixtral(src, tmp_path / 'moe', num_experts=E, top_k=K, load_balancing_loss_weight=0.02,
                               progress=False).path
    for tok_file in corpus['tokenizer'].iterdir():
        (out / tok_file.name).write_bytes(tok_file.read_bytes())
    cfg = om.to_container(om.load(YAMLS / 'hf' / 'mixtral.yaml'), resolve=False)
    cfg['variables'].update(model=str(out), data_dir=str(corpus['domain']), save_folder=str(tmp_path / 'ckpt'),
                            run_name='hf-mixtral', max_seq_len=32, max_duration='2ba', eval_interval='2ba',
                            save_interval='2ba', global_batch_size=4, warmup='1ba')
    cfg['loggers'] = {'inmemory': {}}
    trainer = run_train(copy.deepcopy(cfg))
    model = trainer.state.model
    assert model.model.config.output_router_logits is True
    assert model.model.config.router_aux_loss_coef == 0.02
    x = torch.randint(3, 258, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = {'input_ids': x, 'attention_mask': torch.ones_like(x), 'labels': x}
    outputs = model(batch)
    loss = model.loss(outputs, batch)
    ce = torch.nn.functional.cross_entropy(outputs.logits[:, :-1].reshape(-1, 264), x[:, 1:].reshape(-1))
    assert outputs.aux_loss is not None and outputs.aux_loss > 0
    torch.testing.assert_close(loss, ce + 0.02 * outputs.aux_loss)
    trainer.close()
