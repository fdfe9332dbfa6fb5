"""The `upcycle:` block on foundry's `hf_causal_lm`: a dense Llama directory trains as a Mixtral through
`llmfoundry train`, exact at step 0, with the load-balancing loss in training only, nothing E-times larger on disk;
foundry's hf_checkpointer saves a Mixtral that generates; autoresume skips the dense load; refusals name the key."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from conftest import load_recipe, logged, run_train
from foundry_upcycle.transforms import apply_upcycle_block
from test_import import save_dense

E, K, V = 4, 2, 264  # V >= the corpus tokenizer's 258 tokens


@pytest.fixture(scope='module')
def dense_dir(corpus, tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp('hf') / 'llama'
    save_dense(src, vocab_size=V, max_shard_size='60KB')  # sharded: the index path of the reader
    for f in corpus['tokenizer'].iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    return src


def hf_recipe(arm: str, dense: Path, corpus, out: Path, **variables) -> dict:
    cfg = load_recipe(f'hf/{arm}.yaml')
    cfg['variables'].update({'model': str(dense), 'data_dir': str(corpus['domain']),
                             'eval_data_dir': str(corpus['generic']), 'save_folder': str(out / 'checkpoints'),
                             'run_name': out.name, 'max_seq_len': 32, 'max_duration': '2ba', 'eval_interval': '2ba',
                             'save_interval': '2ba', 'global_batch_size': 4, 'warmup': '0ba', **variables})
    cfg['loggers'] = {'inmemory': {}}
    cfg['eval_subset_num_batches'] = 2
    cfg['device_eval_batch_size'] = 4
    if arm == 'upcycle':
        cfg['upcycle']['num_experts'], cfg['upcycle']['top_k'] = E, K
    return cfg


@pytest.fixture(scope='module')
def arms(dense_dir, corpus, tmp_path_factory):
    """Both shipped hf recipes, 2 steps each: {arm: (trainer, output dir)} (trainers closed)."""
    out = {}
    for arm in ('cpt', 'upcycle'):
        d = tmp_path_factory.mktemp(arm)
        trainer = run_train(hf_recipe(arm, dense_dir, corpus, d))
        trainer.close()
        out[arm] = (trainer, d)
    return out


def test_pair_differs_only_in_the_block():
    cpt, up = load_recipe('hf/cpt.yaml'), load_recipe('hf/upcycle.yaml')
    assert isinstance(up.pop('upcycle'), dict) and up == cpt


def test_expands_to_the_hf_upcycle_model(dense_dir, corpus, tmp_path):
    from omegaconf import OmegaConf as om
    cfg = om.to_container(om.create(hf_recipe('upcycle', dense_dir, corpus, tmp_path / 'r')), resolve=True)
    out = apply_upcycle_block(cfg)
    assert out['model']['name'] == 'hf_upcycle_causal_lm'
    assert out['model']['upcycle'] == {'num_experts': E, 'top_k': K, 'load_balancing_loss_weight': 0.01}
    assert out['callbacks']['upcycle_loader']['source'] == str(dense_dir) and 'load_path' not in out
    assert out['optimizer']['lr'] == 1e-4


def test_step0_ce_equals_cpt_and_lbl_only_in_training(arms):
    (cpt, _), (up, _) = arms['cpt'], arms['upcycle']
    for split in ('domain', 'generic'):
        (b0, ce_cpt), (b1, ce_up) = (logged(t, f'metrics/eval/{split}/LanguageCrossEntropy')[0] for t in (cpt, up))
        assert b0 == b1 == 0 and abs(ce_cpt - ce_up) < 1e-5, (split, ce_cpt, ce_up)
    loader = next(c for c in up.state.callbacks if type(c).__name__ == 'UpcycleLoader')
    assert loader.report['action'] == 'upcycled' and loader.report['layout'] == 'mixtral'
    assert loader.report['fresh_after_load'] is True
    # Step 0's language loss equals CPT's (same function, same batch); the LBL is logged apart and added to total.
    loss, lbl, total = (logged(up, f'loss/train/{k}') for k in ('loss', 'lbl', 'total'))
    assert abs(loss[0][1] - logged(cpt, 'loss/train/total')[0][1]) < 1e-5
    assert all(v > 0 for _, v in lbl) and abs(total[0][1] - loss[0][1] - lbl[0][1]) < 1e-5
    model = up.state.model
    assert model.model.config.output_router_logits is False  # the served config; logits asked for in training only
    assert type(model.model).__name__ == 'MixtralForCausalLM'


def test_hf_checkpointer_saves_a_mixtral_that_generates(arms, dense_dir):
    from transformers import AutoModelForCausalLM
    _, out = arms['upcycle']
    saved = sorted((out / 'checkpoints' / 'hf' / 'huggingface').iterdir())[-1]
    cfg = json.loads((saved / 'config.json').read_text())
    assert cfg['architectures'] == ['MixtralForCausalLM'] and cfg['output_router_logits'] is False
    assert (cfg['num_local_experts'], cfg['num_experts_per_tok'], cfg['router_aux_loss_coef']) == (E, K, 0.01)
    mixtral = AutoModelForCausalLM.from_pretrained(str(saved)).eval()
    x = torch.randint(3, 258, (1, 8), generator=torch.Generator().manual_seed(0))
    gen = mixtral.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False)
    assert gen.shape == (1, 14)


def check_fresh_generation(dense_dir: Path, corpus, tmp_path: Path, prompt: torch.Tensor, recipe=None) -> None:
    """The model the loader fills (before any training) has the dense logits and generates its greedy tokens."""
    from composer import Trainer
    from llmfoundry.utils.builders import build_composer_model, build_tokenizer
    from omegaconf import OmegaConf as om
    from transformers import AutoModelForCausalLM
    from foundry_upcycle.callbacks import UpcycleLoader
    cfg = apply_upcycle_block(om.to_container(om.create((recipe or hf_recipe)('upcycle', dense_dir, corpus, tmp_path)),
                                              resolve=True))
    model_cfg = copy.deepcopy(cfg['model'])
    tokenizer = build_tokenizer(str(dense_dir), {})
    model = build_composer_model(name=model_cfg.pop('name'), cfg=model_cfg, tokenizer=tokenizer)
    loader = UpcycleLoader(**cfg['callbacks']['upcycle_loader'])
    Trainer(model=model, callbacks=[loader], device='cpu', progress_bar=False, log_to_console=False).close()
    assert loader.report['action'] == 'upcycled'
    dense = AutoModelForCausalLM.from_pretrained(str(dense_dir), torch_dtype=torch.float32).eval()
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        want, got = dense.generate(prompt, **kw), model.model.eval().generate(prompt, **kw)
        assert (dense(prompt).logits - model.model(prompt).logits).abs().max() < 1e-4
    assert torch.equal(want, got), (want, got)


def test_fresh_upcycle_generates_the_dense_greedy_tokens(dense_dir, corpus, tmp_path):
    check_fresh_generation(dense_dir, corpus, tmp_path,
                           torch.randint(3, 258, (2, 10), generator=torch.Generator().manual_seed(3)))


def test_autoresume_skips_the_dense_load(arms, dense_dir, corpus):
    _, out = arms['upcycle']
    trainer = run_train(hf_recipe('upcycle', dense_dir, corpus, out, max_duration='3ba'))
    loader = next(c for c in trainer.state.callbacks if type(c).__name__ == 'UpcycleLoader')
    assert loader.report['action'] == 'skipped' and loader.report['fresh_after_load'] is False
    assert [b for b, _ in logged(trainer, 'loss/train/loss')] == [2]
    trainer.close()


def _config_dir(tmp_path: Path, **config) -> Path:
    d = tmp_path / config.get('model_type', 'x')
    d.mkdir()
    (d / 'config.json').write_text(json.dumps(config))
    return d


@pytest.mark.parametrize('config, match', [
    ({'model_type': 'qwen2', 'architectures': ['Qwen2ForCausalLM']},
     r"model_type 'qwen2' \(Qwen2ForCausalLM\) cannot be upcycled into Mixtral exactly: attention q/k/v biases"),
    ({'model_type': 'gemma', 'architectures': ['GemmaForCausalLM']}, r"model_type 'gemma' \(GemmaForCausalLM\)"),
    ({'model_type': 'llama', 'architectures': ['LlamaForCausalLM'], 'attention_bias': True},
     r'LlamaForCausalLM config.json attention_bias=true'),
    ({'model_type': 'llama', 'architectures': ['LlamaForCausalLM'], 'mlp_bias': True},
     r'LlamaForCausalLM config.json mlp_bias=true'),
])
def test_unsupported_families_are_refused_naming_architecture_and_key(config, match, tmp_path, corpus):
    from omegaconf import OmegaConf as om
    src = _config_dir(tmp_path, **config)
    cfg = om.to_container(om.create(hf_recipe('upcycle', src, corpus, tmp_path / 'r')), resolve=True)
    with pytest.raises(ValueError, match=rf'model.pretrained_model_name_or_path: .*{match}'):
        apply_upcycle_block(cfg)


@pytest.mark.parametrize('block, match', [
    ({'router_weights': 'softmax'}, 'upcycle.router_weights'), ({'zloss_weight': 0.1}, 'upcycle.zloss_weight'),
    ({'from': '/elsewhere'}, 'upcycle.from'),
])
def test_options_mixtral_cannot_hold_are_refused(block, match, dense_dir, corpus, tmp_path):
    from omegaconf import OmegaConf as om
    cfg = om.to_container(om.create(hf_recipe('upcycle', dense_dir, corpus, tmp_path / 'r')), resolve=True)
    cfg['upcycle'].update(block)
    with pytest.raises(ValueError, match=match):
        apply_upcycle_block(cfg)


def test_gguf_tokenizer_model_is_refused_before_training(dense_dir, corpus, tmp_path):
    """transformers' GGUF tokenizer saves the GGUF file as tokenizer.model, which Composer parses as SentencePiece
    when it saves a checkpoint: the transform refuses it up front, naming the file."""
    from omegaconf import OmegaConf as om
    tok = tmp_path / 'tok'
    tok.mkdir()
    for f in corpus['tokenizer'].iterdir():
        (tok / f.name).write_bytes(f.read_bytes())
    (tok / 'tokenizer.model').write_bytes(b'GGUF\x03\x00\x00\x00rest-of-a-gguf-file')
    cfg = om.to_container(om.create(hf_recipe('upcycle', dense_dir, corpus, tmp_path / 'r', tokenizer=str(tok))),
                          resolve=True)
    with pytest.raises(ValueError, match=r'tokenizer.name: .*tokenizer.model is a GGUF file'):
        apply_upcycle_block(cfg)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_fsdp2_on_two_processes_matches_one(dense_dir, corpus, tmp_path):
    """`composer -n 2` with FSDP2 (gloo): the same step-0 CE, per-step losses and trained parameters as one
    process; only rank 0 opens the dense directory."""
    import subprocess
    import sys
    from conftest import REPO
    from distributed_worker import run_mode
    from test_distributed import FSDP2, _env, _fsdp
    base = hf_recipe('upcycle', dense_dir, corpus, tmp_path / 'base')
    base['device_train_microbatch_size'] = 1  # the LBL is nonlinear in the microbatch: one sequence each
    base['eval_subset_num_batches'] = -1  # the whole val split, however the ranks divide it
    single = copy.deepcopy(base)
    single['variables'].update(run_name='single', save_folder=str(tmp_path / 'single' / 'checkpoints'))
    one = run_mode('single', single, tmp_path, {})
    spec = tmp_path / 'spec.json'
    spec.write_text(json.dumps({'out': str(tmp_path), 'base': base,
                                'modes': {'fsdp2': {'overrides': _fsdp(), 'env': FSDP2}}}))
    cmd = [sys.executable, '-m', 'composer.cli.launcher', '-n', '2', '--master_port', str(_free_port()),
           str(REPO / 'tests' / 'distributed_worker.py'), str(spec)]
    run = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    two = json.loads((tmp_path / 'results.json').read_text())['fsdp2']
    assert 'error' not in two and 'error' not in one, (two.get('traceback'), one.get('traceback'))
    assert two['fsdp'] and two['loader']['action'] == 'upcycled' and two['opened_by_rank'] == [1, 0]
    for split in ('domain', 'generic'):
        assert abs(one['ce0'][split][0][1] - two['ce0'][split][0][1]) < 1e-5
    for key in ('loss', 'lbl'):
        torch.testing.assert_close([v for _, v in two[key]], [v for _, v in one[key]], rtol=1e-5, atol=1e-6)
    p1 = torch.load(tmp_path / 'single.params.pt', weights_only=True)
    p2 = torch.load(tmp_path / 'fsdp2.params.pt', weights_only=True)
    assert p1.keys() == p2.keys()
    for key in p1:
        torch.testing.assert_close(p2[key], p1[key], rtol=0, atol=1e-5, msg=lambda m: f'{key}: {m}')
