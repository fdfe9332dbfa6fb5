"""Per-arm evaluation: held-out CE against an independent computation (dense and torch_dmoe, Composer-written
checkpoints), the v0.3 gauntlet math against foundry's own EvalGauntlet, task selection / missing data, and a
real ICL run over two tasks of the eval samples shipped in the package; the shipped samples themselves."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SEQ
from foundry_upcycle.study import gauntlet as G
from foundry_upcycle.study.config import EvalConfig, shipped_eval_data
from foundry_upcycle.study.evaluate import EvalSession, eval_model_config, evaluate_checkpoint
from foundry_upcycle.study.gauntlet import GauntletSpec, gauntlet_scores, missing_tasks, prepare_gauntlet

SHIPPED = shipped_eval_data()
VAL_SAMPLES = 10  # with batch 4: a partial last batch
ATTN = {'attn_type': 'grouped_query_attention', 'attn_impl': 'torch', 'kv_n_heads': 2, 'rope': True,
        'rope_impl': 'hf'}
MOE_FFN = {'ffn_type': 'torch_dmoe', 'ffn_hidden_size': 128, 'ffn_act_fn': {'name': 'silu'}, 'mlp_type': 'glu',
           'moe_num_experts': 4, 'moe_top_k': 2, 'moe_normalize_expert_weights': 1, 'moe_jitter_eps': None,
           'uniform_expert_assignment': False}


def model_cfg(kind: str, vocab: int) -> dict:
    ffn = MOE_FFN if kind == 'moe' else {'ffn_type': 'mptglu', 'ffn_act_fn': {'name': 'silu'}, 'ffn_hidden_size': 128}
    return {'name': 'mpt_causal_lm', 'd_model': 64, 'n_heads': 4, 'n_layers': 2, 'max_seq_len': SEQ,
            'vocab_size': vocab, 'no_bias': True, 'norm_type': 'rmsnorm', 'tie_word_embeddings': False,
            'learned_pos_emb': False, 'attn_config': dict(ATTN), 'ffn_config': dict(ffn),
            'loss_fn': 'torch_crossentropy', 'init_device': 'cpu'}


def build_model(cfg: dict):
    from llmfoundry.models.mpt import ComposerMPTCausalLM
    kwargs = {k: v for k, v in cfg.items() if k != 'name'}
    return ComposerMPTCausalLM(**kwargs)


@pytest.fixture(scope='module')
def vocab(corpus) -> int:
    from transformers import AutoTokenizer
    return len(AutoTokenizer.from_pretrained(str(corpus['tokenizer'])))


@pytest.fixture(scope='module')
def val_splits(tmp_path_factory, vocab) -> dict[str, tuple[Path, np.ndarray]]:
    """Two MDS validation splits as foundry's text-to-MDS writes them (`tokens: ndarray:int32`), and their tokens."""
    from streaming import MDSWriter
    root = tmp_path_factory.mktemp('val')
    out = {}
    for name, high in (('generic', vocab), ('domain', 40)):  # different token distributions -> different CE
        # ids 0 and 1 are <|endoftext|> and <|pad|>: real text has no pad, and foundry's collator masks it
        tokens = np.random.default_rng(len(name)).integers(2, high, (VAL_SAMPLES, SEQ)).astype(np.int32)
        with MDSWriter(out=str(root / name), columns={'tokens': 'ndarray:int32'}) as w:
            for row in tokens:
                w.write({'tokens': row})
        out[name] = (root / name, tokens)
    return out


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory, vocab) -> dict[str, tuple[Path, dict]]:
    """A dense and a torch_dmoe MPT, each trained one step by a Composer Trainer that saves the checkpoint."""
    from composer import Trainer
    root = tmp_path_factory.mktemp('ckpt')
    out = {}
    for kind in ('dense', 'moe'):
        torch.manual_seed(1)
        cfg = model_cfg(kind, vocab)
        model = build_model(cfg)
        x = torch.randint(0, vocab, (4, SEQ))
        batches = [{'input_ids': x[i], 'labels': x[i], 'attention_mask': torch.ones(SEQ, dtype=torch.long)}
                   for i in range(4)]
        trainer = Trainer(model=model, train_dataloader=torch.utils.data.DataLoader(batches, batch_size=4),
                          max_duration='1ba', optimizers=torch.optim.SGD(model.parameters(), lr=1.0),
                          save_folder=str(root / kind), save_filename='ep{epoch}-ba{batch}.pt', save_interval='1ba',
                          progress_bar=False, log_to_console=False, loggers=[], seed=1)
        trainer.fit()
        trainer.close()
        out[kind] = (root / kind / 'ep0-ba1.pt', cfg)
    return out


def independent_ce(ckpt: Path, cfg: dict, tokens: np.ndarray) -> float:
    """Next-token CE over every position, with the model run directly (no foundry loaders, metrics or Trainer)."""
    model = build_model(cfg).eval()
    state = torch.load(ckpt, map_location='cpu', weights_only=False)['state']['model']  # our own test file
    model.load_state_dict(state)
    ids = torch.from_numpy(tokens.astype(np.int64))
    with torch.no_grad():
        logits = model.model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             ids[:, 1:].reshape(-1)).item()


@pytest.mark.parametrize('kind', ['dense', 'moe'])
def test_ce_matches_an_independent_computation(kind, corpus, val_splits, checkpoints, tmp_path):
    ckpt, cfg = checkpoints[kind]
    data = {name: path for name, (path, _) in val_splits.items()}
    res = evaluate_checkpoint(ckpt, cfg, corpus['tokenizer'], data, icl=None, seq_len=SEQ, batch_size=4,
                              work_dir=tmp_path, progress=False)
    for name, (_, tokens) in val_splits.items():
        assert np.isfinite(res[f'ce_{name}'])
        assert res[f'ce_{name}'] == pytest.approx(independent_ce(ckpt, cfg, tokens), rel=1e-5, abs=1e-6)
    assert abs(res['ce_generic'] - res['ce_domain']) > 1e-3  # far above the tolerance: a swap would fail
    assert res['tasks'] == {} and res['core_average'] is None and res['core_average_foundry'] is None


def test_losses_are_attributed_to_their_documents(corpus, val_splits, checkpoints, tmp_path):
    """Per-document sums (document spans in the token stream, EOS included) against the model run directly: each
    predicted token's loss lands in the document that holds it, and the sums give the split's CE."""
    ckpt, cfg = checkpoints['dense']
    path, tokens = val_splits['domain']
    stream = tokens.size
    spans = [37, 5, 90, 1, stream - 37 - 5 - 90 - 1 - 20, 20 + 64]     # the last one runs past the dropped tail
    res = evaluate_checkpoint(ckpt, cfg, corpus['tokenizer'], {'domain': path}, icl=None, seq_len=SEQ, batch_size=4,
                              work_dir=tmp_path, progress=False, doc_tokens={'domain': spans})
    model = build_model(cfg).eval()
    model.load_state_dict(torch.load(ckpt, map_location='cpu', weights_only=False)['state']['model'])
    ids = torch.from_numpy(tokens.astype(np.int64))
    with torch.no_grad():
        logits = model.model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                             reduction='none').view(ids.shape[0], -1)
    want = [[0.0, 0] for _ in spans]
    ends = np.cumsum(spans)
    for s in range(ids.shape[0]):
        for j in range(SEQ - 1):
            doc = int(np.searchsorted(ends, s * SEQ + j + 1, side='right'))
            want[doc][0] += loss[s, j].item()
            want[doc][1] += 1
    units = res['heldout']['domain']['units']
    assert res['heldout']['domain']['unit'] == 'document' and [u[1] for u in units] == [w[1] for w in want]
    assert [u[0] for u in units] == pytest.approx([w[0] for w in want], rel=1e-5, abs=1e-5)
    assert sum(u[0] for u in units) / sum(u[1] for u in units) == pytest.approx(res['ce_domain'], rel=1e-9)


def test_checkpoint_that_does_not_match_the_config_is_refused(corpus, val_splits, checkpoints, tmp_path):
    dense_ckpt, _ = checkpoints['dense']
    _, moe_cfg = checkpoints['moe']
    with pytest.raises(ValueError, match=r'ep0-ba1\.pt does not match the model config.*router'):
        evaluate_checkpoint(dense_ckpt, moe_cfg, corpus['tokenizer'], {'generic': val_splits['generic'][0]},
                            icl=None, seq_len=SEQ, batch_size=4, work_dir=tmp_path, progress=False)


def test_icl_end_to_end_on_shipped_data(corpus, val_splits, checkpoints, tmp_path):
    """foundry's ICL builders + EvalGauntlet on 20-example subsets of the shipped copa and winograd, dense and MoE in
    one session; results are accuracies, the core averages follow from them, and a second run repeats the first."""
    spec = GauntletSpec(local_data=str(SHIPPED), tasks=('copa', 'winograd'), max_examples_per_task=20)
    session = EvalSession(corpus['tokenizer'], {'domain': val_splits['domain'][0]}, spec, SEQ, 8, tmp_path,
                          progress=False)
    results = {kind: session.evaluate(*checkpoints[kind]) for kind in ('dense', 'moe')}
    again = session.evaluate(*checkpoints['dense'])
    assert again == results['dense']
    for res in results.values():
        assert set(res['tasks']) == {'copa', 'winograd'}
        assert res['icl_examples'] == {'copa': 20, 'winograd': 20}
        for acc in res['tasks'].values():
            assert 0.0 <= acc <= 1.0 and (acc * 20) == pytest.approx(round(acc * 20), abs=1e-4)
        copa, wino = (G.rescaled(res['tasks'][t], 0.5) for t in ('copa', 'winograd'))
        assert res['core_average'] == pytest.approx((copa + wino) / 2)
        assert res['categories']['commonsense_reasoning']['score'] == pytest.approx(copa)
        assert res['core_average_foundry'] is None  # no category is complete with two tasks
        assert res['categories_dropped_by_foundry'] == list(G.CATEGORIES)
        assert res['categories_without_tasks'] == ['world_knowledge', 'symbolic_problem_solving',
                                                   'reading_comprehension']
        assert 'hellaswag' in res['missing_tasks'] and 'piqa' in res['not_selected_tasks']
        assert 'siqa' in res['missing_tasks']              # not shipped
        assert np.isfinite(res['ce_domain'])
    assert sorted(p.name for p in (tmp_path / 'icl_data' / 'commonsense_reasoning').iterdir()) == ['copa.jsonl']


# ------------------------------------------------------------------------------------------- gauntlet math

HAND_BUILT = {
    # commonsense_reasoning: complete -> kept by foundry
    'copa': 0.6, 'siqa': 0.55, 'commonsense_qa': 0.4, 'piqa': 0.5, 'openbook_qa': 0.25,
    'bigbench_strange_stories': 0.7, 'bigbench_strategy_qa': 0.5,
    # language_understanding: hellaswag and winogrande absent -> dropped by foundry
    'lambada_openai': 0.3, 'winograd': 0.6,
    # world_knowledge: arc_easy only
    'arc_easy': 0.5,
}


def test_gauntlet_math_on_hand_built_accuracies():
    s = gauntlet_scores(HAND_BUILT)
    commonsense = ((0.6 - .5) / .5 + (0.55 - .5) / .5 + (0.4 - .25) / .75 + 0 + 0 + (0.7 - .5) / .5 + 0) / 7
    language = (0.3 + (0.6 - .5) / .5) / 2
    world = (0.5 - .25) / .75
    assert s['categories']['commonsense_reasoning']['score'] == pytest.approx(commonsense)
    assert s['categories']['language_understanding']['score'] == pytest.approx(language)
    assert s['categories']['world_knowledge']['score'] == pytest.approx(world)
    assert s['core_average'] == pytest.approx((commonsense + language + world) / 3)
    assert s['core_average_foundry'] == pytest.approx(commonsense)
    assert s['categories_dropped_by_foundry'] == ['world_knowledge', 'language_understanding',
                                                  'symbolic_problem_solving', 'reading_comprehension']
    assert s['categories_without_tasks'] == ['symbolic_problem_solving', 'reading_comprehension']
    assert s['categories']['language_understanding']['missing'] == ['hellaswag', 'winogrande']
    assert gauntlet_scores({})['core_average'] is None


class _Metric:
    def __init__(self, value: float):
        self.value = value

    def compute(self):
        return torch.tensor(self.value)


class _State:
    def __init__(self, accuracies: dict[str, float]):
        self.eval_metrics = {f'{t}/{G.BENCHMARKS[t][1]}-shot': {'InContextLearningMultipleChoiceAccuracy':
                                                               _Metric(a)} for t, a in accuracies.items()}


@pytest.mark.parametrize('accuracies', [HAND_BUILT, {t: 0.3 + 0.01 * i for i, t in enumerate(G.BENCHMARKS)}],
                         ids=['partial', 'complete'])
def test_our_foundry_rule_equals_foundrys_eval_gauntlet(accuracies):
    from llmfoundry.callbacks import EvalGauntlet
    cfg = G.eval_gauntlet_config()
    keys = [f'metrics/{t}/{G.BENCHMARKS[t][1]}-shot/InContextLearningMultipleChoiceAccuracy' for t in accuracies]
    theirs = EvalGauntlet(logger_keys=keys, benchmark_sizes={}, **cfg).eval_after_all(_State(accuracies), None)
    ours = gauntlet_scores(accuracies)
    assert theirs['icl/metrics/eval_gauntlet/core_average'] == pytest.approx(ours['core_average_foundry'], rel=1e-6)
    for cat, entry in ours['categories'].items():
        want = entry['score_foundry']          # None: a category foundry drops (newer pytest refuses approx(None))
        got = theirs.get(f'icl/metrics/eval_gauntlet/{cat}')
        assert got is None if want is None else got == pytest.approx(want, rel=1e-6), (cat, got, want)
    if len(accuracies) == len(G.BENCHMARKS):
        assert ours['core_average'] == pytest.approx(ours['core_average_foundry'])


# ------------------------------------------------------------------------------- task selection and data


def test_the_v03_tables_agree():
    assert set(G.TASKS_V03) == set(G.BENCHMARKS) and len(G.BENCHMARKS) == 31
    assert tuple(G.GAUNTLET_V03) == G.CATEGORIES
    assert set(G.DEFAULT_TASKS) <= set(G.BENCHMARKS)
    assert {G.BENCHMARKS[t][0] for t in G.DEFAULT_TASKS} == set(G.CATEGORIES)


def test_shipped_samples_cover_the_default_tasks_with_sources():
    """Every default task is shipped (a few hundred examples, valid JSON lines) and listed with its licence."""
    sources = (SHIPPED / 'SOURCES.md').read_text()
    assert set(G.DEFAULT_TASKS) <= set(G.BENCHMARKS) - set(missing_tasks(SHIPPED))
    for task in G.DEFAULT_TASKS:
        rel = G.TASKS_V03[task][0]
        rows = [json.loads(x) for x in (SHIPPED / rel).read_text(encoding='utf-8').splitlines()]
        assert 100 <= len(rows) <= 300, task
        line = next(x for x in sources.splitlines() if x.startswith(f'| {rel} |'))
        assert len(line.split('|')) == 6 and line.split('|')[4].strip(), line        # source and licence
    assert EvalConfig().resolved_local_data() == str(SHIPPED)                        # the default, anywhere
    assert EvalConfig().local_data_id().startswith('shipped:') and str(SHIPPED) not in EvalConfig().local_data_id()


def _fake_local_data(root: Path) -> Path:
    for task, lines in (('copa', 7), ('lambada_openai', 5)):
        f = root / G.TASKS_V03[task][0]
        f.parent.mkdir(parents=True, exist_ok=True)
        rows = ([{'query': f'q{i}', 'choices': ['a', 'b' * (i + 1)], 'gold': 0} for i in range(lines)]
                if task == 'copa' else [{'context': f'c{i}', 'continuation': 'x' * (i + 1)} for i in range(lines)])
        f.write_text('\n'.join(json.dumps(r) for r in rows) + '\n')
    return root


def test_prepare_lists_missing_tasks_and_writes_seeded_subsets(tmp_path, caplog):
    local = _fake_local_data(tmp_path / 'local')
    spec = GauntletSpec(local_data=str(local), tasks=('copa', 'lambada_openai', 'hellaswag'), max_examples_per_task=3)
    with caplog.at_level(logging.WARNING):
        prep = prepare_gauntlet(spec, tmp_path / 'a')
    assert "['hellaswag']" in caplog.text
    assert prep.tasks == ['copa', 'lambada_openai']
    assert prep.missing == [t for t in G.BENCHMARKS if t not in ('copa', 'lambada_openai')]
    assert prep.num_examples == {'copa': 3, 'lambada_openai': 3}
    assert [t['num_fewshot'] for t in prep.icl_tasks] == [[0], [0]]
    first = (tmp_path / 'a' / G.TASKS_V03['copa'][0]).read_text()
    assert len(first.splitlines()) == 3
    assert prepare_gauntlet(spec, tmp_path / 'b').icl_tasks[0]['dataset_uri'].endswith('copa.jsonl')
    assert (tmp_path / 'b' / G.TASKS_V03['copa'][0]).read_text() == first
    # answers longer than the sequence are skipped (here: 1 token per character, seq 4 -> at most 3 characters)
    prep = prepare_gauntlet(GauntletSpec(local_data=str(local), tasks=('copa', 'lambada_openai'),
                                         max_examples_per_task=None), tmp_path / 'c', count_tokens=len, seq_len=4)
    assert prep.too_long == {'copa': 4, 'lambada_openai': 2} and prep.num_examples == {'copa': 3, 'lambada_openai': 3}
    kept = [json.loads(x) for x in (tmp_path / 'c' / G.TASKS_V03['lambada_openai'][0]).read_text().splitlines()]
    assert [k['continuation'] for k in kept] == ['x', 'xx', 'xxx']


def test_spec_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match='/nonexistent/local_data is not a directory'):
        GauntletSpec(local_data='/nonexistent/local_data')
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['hellaswagg'\]"):
        GauntletSpec(local_data=str(tmp_path), tasks=('copa', 'hellaswagg'))
    with pytest.raises(ValueError, match='max_examples_per_task'):
        GauntletSpec(local_data=str(tmp_path), max_examples_per_task=0)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['max_examples'\]"):
        GauntletSpec.from_mapping({'local_data': str(tmp_path), 'max_examples': 5})
    spec = GauntletSpec.from_mapping({'local_data': str(tmp_path), 'tasks': ['copa']})
    assert spec.tasks == ('copa',) and GauntletSpec.from_mapping(spec.to_mapping()) == spec
    assert GauntletSpec(local_data=str(tmp_path), tasks='all').selected() == list(G.BENCHMARKS)


def test_session_input_errors_name_the_path(corpus, tmp_path):
    with pytest.raises(ValueError, match=r"eval_data\['domain'\]: /nonexistent/val is not an MDS split"):
        EvalSession(corpus['tokenizer'], {'domain': '/nonexistent/val'}, None, SEQ, 4, tmp_path)
    with pytest.raises(ValueError, match='tokenizer: /nonexistent/tok'):
        EvalSession('/nonexistent/tok', {}, None, SEQ, 4, tmp_path)
    with pytest.raises(ValueError, match='batch_size'):
        EvalSession(corpus['tokenizer'], {}, None, SEQ, 0, tmp_path)


def test_cpu_model_config(caplog):
    mb = {'name': 'mpt_causal_lm', 'attn_config': {'attn_impl': 'flash'}, 'loss_fn': 'fused_crossentropy',
          'init_device': 'meta',
          'ffn_config': {'ffn_type': 'mb_dmoe', 'ffn_hidden_size': 64, 'moe_num_experts': 8, 'moe_top_k': 2,
                         'mlp_type': 'glu', 'moe_world_size': 1, 'mlp_impl': 'grouped', 'moe_loss_weight': 0.01}}
    with caplog.at_level(logging.WARNING):
        name, cfg = eval_model_config(mb, cuda=False)
    assert name == 'mpt_causal_lm' and 'mb_dmoe -> torch_dmoe' in caplog.text and 'flash' in caplog.text
    assert cfg['attn_config']['attn_impl'] == 'torch' and cfg['loss_fn'] == 'torch_crossentropy'
    assert cfg['init_device'] == 'cpu'
    assert cfg['ffn_config'] == {'ffn_type': 'torch_dmoe', 'ffn_hidden_size': 64, 'moe_num_experts': 8,
                                 'moe_top_k': 2, 'mlp_type': 'glu', 'ffn_act_fn': {'name': 'gelu', 'approximate':
                                                                                   'tanh'},
                                 'moe_jitter_eps': None, 'moe_normalize_expert_weights': None,
                                 'uniform_expert_assignment': False}
    assert mb['ffn_config']['ffn_type'] == 'mb_dmoe'  # the caller's config is not modified
    with pytest.raises(ValueError, match='no `name`'):
        eval_model_config({'d_model': 64}, cuda=False)
