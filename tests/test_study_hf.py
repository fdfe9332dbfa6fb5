"""The study on a real dense base (`hf_base`): a Hugging Face Llama directory, CPT vs upcycling through the yamls/hf
recipes at matched FLOPs, on the built-in-style data tokenized with the model's own tokenizer; the default's
statistics and report. End to end on a tiny random Llama (a few steps), plus the refusals and the FLOP counts."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from conftest import SEQ
from foundry_upcycle.study import pipeline as P
from foundry_upcycle.study.config import StudyConfig
from foundry_upcycle.study.flops import param_counts, train_flops_per_token
from foundry_upcycle.study.report import check_results
from test_import import save_dense
from test_study import text_dirs  # noqa: F401  (fixture)

V = 264   # >= the corpus tokenizer's 258 tokens


@pytest.fixture(scope='module')
def llama_dir(corpus, tmp_path_factory) -> Path:
    """A tiny random Llama (3 layers, d 64, GQA 4/2) with a byte-level BPE tokenizer (eos <|endoftext|>)."""
    src = tmp_path_factory.mktemp('base') / 'llama'
    save_dense(src, vocab_size=V, max_position_embeddings=128, max_shard_size='60KB')
    for f in corpus['tokenizer'].iterdir():
        shutil.copy(f, src / f.name)
    return src


def hf_config(text_dirs, base: Path, out: Path, **changes) -> StudyConfig:  # noqa: F811
    block = {
        'out': str(out), 'hf_base': str(base), 'pretrain_tokens': 4 * 4 * SEQ, 'budgets': [1.0],
        'max_seq_len': SEQ, 'global_batch_size': 4, 'upcycle': {'num_experts': 4},
        'data': {'generic_dir': str(text_dirs['generic']), 'domain_dir': str(text_dirs['domain']),
                 'generic_train_chars': 20_000, 'generic_val_chars': 2_000, 'generic_test_chars': 2_500,
                 'domain_train_chars': 20_000, 'domain_val_chars': 2_000, 'domain_test_chars': 2_500,
                 'eval_doc_chars': 1_200},
        'eval': {'tasks': ['copa'], 'max_examples_per_task': 4, 'batch_size': 8},
        'inference': {'num_requests': 2, 'batch_sizes': [2], 'input_tokens': 8, 'output_tokens': 4},
        'progress': False, 'seeds': 2, 'lr_sweep': [1e-3, 2e-3], 'lr_extend': 0, 'lr_check': 'off',
    }
    block.update(changes)
    return StudyConfig.from_mapping(block)


@pytest.mark.slow
def test_real_base_study_end_to_end(text_dirs, llama_dir, tmp_path):  # noqa: F811
    out = tmp_path / 'study'
    study = P.Study(hf_config(text_dirs, llama_dir, out))
    results = study.run()
    on_disk = json.loads((out / 'results.json').read_text())
    check_results(on_disk)
    # the model's own tokenizer, not a BPE trained here; the base is the directory, not pretrained
    data = json.loads((out / 'data' / 'manifest.json').read_text())
    assert (out / 'data' / 'tokenizer' / 'tokenizer.json').read_bytes() == (llama_dir / 'tokenizer.json').read_bytes()
    assert data['vocab_size'] == 258 and on_disk['dense']['pretrain_steps'] is None
    assert on_disk['dense']['pretrain_tokens'] == 4 * 4 * SEQ and not (out / 'dense' / 'checkpoints').exists()
    by = {a['arm']: a for a in on_disk['arms']}
    cpt, up = by['cpt'], by['upcycle']
    # matched FLOPs from config.json: the MoE (4 experts, top-2) sees fewer tokens, each costing more
    assert cpt['steps'] == 4 and 1 <= up['steps'] < 4 and up['flops_per_token'] > cpt['flops_per_token']
    assert cpt['total_params'] == cpt['active_params'] == sum(p.numel() for p in _dense_model(llama_dir).parameters())
    assert up['total_params'] > up['active_params'] > cpt['active_params']
    # step 0: the upcycled Mixtral (copied experts, renormalised top-2) is the dense base, so on the same first batch
    # (same data seed) both arms log the same training loss
    for c_seed, u_seed in zip(cpt['per_seed'], up['per_seed']):
        assert c_seed['seed'] == u_seed['seed']
        assert u_seed['loss_curve'][0][1] == pytest.approx(c_seed['loss_curve'][0][1], abs=1e-4)
    budget = on_disk['dense']['pretrain_flops']
    for a in (cpt, up):
        assert abs(a['train_flops'] - budget) <= 0.5 * a['flops_per_token'] * 4 * SEQ + 1e-6 * budget
    # the default's statistics: lrs chosen on validation, the paired test on the test split over 2 seeds
    sweep = on_disk['lr']['sweep']
    assert sweep['split'] == 'validation' and set(sweep['chosen']) == {'cpt', 'upcycle'}
    c = on_disk['comparisons']['upcycle']['1']['ce_domain']
    assert c['n_seeds'] == 2 and 'paired t' in c['test'] and c['ci'][0] <= c['gap'] <= c['ci'][1]
    assert on_disk['eval_sets']['domain']['split'] == 'test'
    for a in (cpt, up):
        assert a['n_seeds'] == 2 and all(math.isfinite(s['eval']['ce_domain']) for s in a['per_seed'])
        assert set(a['eval']['tasks']) == {'copa'}
    # trained through the hf recipes: CPT an hf_causal_lm, upcycling a Mixtral (router monitor, LBL logged)
    runs = {n: json.loads((out / n / 'stage.json').read_text())['outputs'] for n in study.stages.ran
            if n.startswith('arms/')}
    models = {o['model']['name'] for o in runs.values()}
    assert models == {'hf_causal_lm', 'hf_upcycle_causal_lm'} and 'lbl_final' in up and up['router']
    router = up['router']      # the Mixtral's routers: loads sum to 1; the copied experts are identical at step 0
    assert sum(router[f'layer0/load/expert{e}'][0][1] for e in range(4)) == pytest.approx(1)
    assert all(router[f'layer{i}/expert_spread'][0] == [1, 0.0] for i in range(3))
    saved = [out / n / o['hf'] for n, o in runs.items() if o['model']['name'] == 'hf_upcycle_causal_lm']
    assert all(json.loads((p / 'config.json').read_text())['num_local_experts'] == 4 for p in saved)
    # the base's own eval is the model as given; the report has the default's sections; inference used the saves
    assert math.isfinite(on_disk['dense']['eval']['ce_domain'])
    assert on_disk['regime']['base_tokens_per_param'] < 1      # this random base is no real model
    report = (out / 'report.md').read_text()
    assert '## Inference cost' in report and '## Regime' in report
    assert json.loads((out / 'inference' / 'stage.json').read_text())['outputs']['hf']['moe'].endswith('ba' + str(
        up['steps']))
    assert on_disk['timing']['step_time_s']['upcycle'] > 0
    # a rerun skips every stage (the base's path is in no hash; its contents are)
    rerun = P.Study(hf_config(text_dirs, llama_dir, out))
    rerun.run()
    assert rerun.stages.ran == []
    assert results['token_ratio'] == pytest.approx(cpt['flops_per_token'] / up['flops_per_token'])


def _dense_model(path: Path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path))


def test_flops_of_a_transformers_config_match_the_built_models(llama_dir):
    """The FLOP count reads config.json: Llama and the Mixtral the upcycle block builds, parameters as built."""
    from transformers import MixtralForCausalLM
    from foundry_upcycle.llama_to_mixtral import read_dense_config, upcycled_mixtral_config
    dense = read_dense_config(llama_dir)
    moe = upcycled_mixtral_config(dense, 4, 2, 1, 1, 0.01).to_dict()
    n_dense = sum(p.numel() for p in _dense_model(llama_dir).parameters())
    n_moe = sum(p.numel() for p in MixtralForCausalLM(upcycled_mixtral_config(dense, 4, 2, 1, 1, 0.01)).parameters())
    assert param_counts(dense) == (n_dense, n_dense)
    total, active = param_counts(moe)
    assert total == n_moe and active == n_dense + 3 * dense['hidden_size'] * dense['intermediate_size'] * \
        dense['num_hidden_layers'] + 4 * dense['hidden_size'] * dense['num_hidden_layers']
    assert train_flops_per_token(moe, SEQ) > train_flops_per_token(dense, SEQ)


@pytest.mark.parametrize('changes, match', [
    ({'pretrain_tokens': None}, r'hf_base needs pretrain_tokens'),
    ({'pretrain_steps': 10}, r"hf_base: \['pretrain_steps'\] do not apply"),
    ({'dense_checkpoint': 'x.pt'}, r"hf_base: \['dense_checkpoint'\] do not apply"),
    ({'scale': '436m'}, r'hf_base: scale 436m does not apply'),
    ({'upcycle': {'router_weights': 'softmax'}}, r'upcycle.router_weights=.softmax.: not available with hf_causal_lm'),
    ({'hf_base': '/nonexistent/llama'}, r'hf_base: /nonexistent/llama is not a Hugging Face model directory'),
    ({'hf_bas': '/x'}, r"study config: unknown key\(s\) \['hf_bas'\]"),
])
def test_bad_real_base_input_is_refused_before_any_training(text_dirs, llama_dir, tmp_path, changes, match):  # noqa: F811
    out = tmp_path / 'out'
    with pytest.raises(ValueError, match=match):
        P.Study(hf_config(text_dirs, llama_dir, out, **changes)).run()
    assert not out.exists() or [p.name for p in out.iterdir()] == [], list(out.iterdir())


@pytest.mark.parametrize('changes, match', [
    ({'attention_bias': True}, r'attention_bias=true: Mixtral holds no biases'),
    ({'model_type': 'gpt2', 'architectures': ['GPT2LMHeadModel']},
     r"model_type 'gpt2' \(GPT2LMHeadModel\) cannot be upcycled into Mixtral exactly: not a Llama-family layout"),
])
def test_a_family_mixtral_cannot_hold_is_refused_naming_it(text_dirs, llama_dir, tmp_path, changes, match):  # noqa: F811
    other = tmp_path / 'other'
    shutil.copytree(llama_dir, other)
    cfg = json.loads((other / 'config.json').read_text())
    (other / 'config.json').write_text(json.dumps({**cfg, **changes}))
    with pytest.raises(ValueError, match=match):
        P.Study(hf_config(text_dirs, other, tmp_path / 'out')).run()
    assert not (tmp_path / 'out').exists() or not list((tmp_path / 'out').iterdir())


def test_a_tiny_budget_on_a_real_base_is_not_called_the_papers_regime():
    """A real base (over-trained, far below chance) at the budgets a CPU affords is no test of the paper's claim."""
    from foundry_upcycle.study.regime import regime
    dense = {'pretrain_tokens': 2 * 10**12, 'params': 134_515_008, 'eval': {'ce_domain': 3.46}}
    arms = [{'arm': a, 'budget': 3e-9, 'tokens': 6144, 'eval': {'ce_domain': 3.38}} for a in ('cpt', 'upcycle')]
    r = regime(dense, arms, 49152, None, {'cpt': 5e-5, 'upcycle': 1e-4})
    assert not r['tests_paper_claim'] and r['why_not'] == [
        "the largest budget, 3e-09 of the base's pretraining FLOPs, is far below the paper's 0.1-1.0: phase 2 barely "
        'moves the base']
    assert regime(dense, [{**a, 'budget': 0.1} for a in arms], 49152, None, {'cpt': 5e-5})['tests_paper_claim']
