"""The study end to end: a reduced run produces a valid results.json, report and plots; the same seed gives the
same numbers; reruns skip finished stages and redo only what a change touches; bad input is refused before any
training; the paper-scale recipes build at their full shapes and train two steps on CPU."""
from __future__ import annotations

import copy
import json
import math
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

from conftest import SEQ
from foundry_upcycle.cli import main as cli_main
from foundry_upcycle.study import pipeline as P
from foundry_upcycle.study import training as T
from foundry_upcycle.study.recipes import shipped_models
from foundry_upcycle.study.results import without_wall_clock
from foundry_upcycle.study.config import StudyConfig, check_paths, parse_budgets
from foundry_upcycle.study.report import FIGURES, check_results

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
GENERIC_FILES = ('textwrap.py', 'argparse.py', 'this.py', 'shlex.py', 'glob.py', 'fnmatch.py')
DOMAIN_FILES = ('heapq.py', 'bisect.py', 'functools.py', 'keyword.py', 'colorsys.py', 'sched.py')


@pytest.fixture(scope='module')
def text_dirs(tmp_path_factory) -> dict[str, Path]:
    """Two small text folders (users' own corpora): stdlib modules, split into files."""
    root = tmp_path_factory.mktemp('text')
    stdlib = Path(sysconfig.get_paths()['stdlib'])
    out = {}
    for name, files in (('generic', GENERIC_FILES), ('domain', DOMAIN_FILES)):
        (root / name).mkdir()
        for f in files:
            shutil.copy(stdlib / f, root / name / f)
        out[name] = root / name
    return out


def small_config(text_dirs, out: Path, **changes) -> StudyConfig:
    """The tiny study shrunk: d_model 64 / 2 layers, 4 experts, seq 32, a few steps, 2 budgets, 2 ICL tasks."""
    block = {
        'out': str(out), 'pretrain_steps': 12, 'budgets': [0.5, 1.0], 'max_seq_len': SEQ, 'global_batch_size': 4,
        'model': {'d_model': 64, 'n_layers': 2}, 'upcycle': {'num_experts': 4},
        'data': {'generic_dir': str(text_dirs['generic']), 'domain_dir': str(text_dirs['domain']), 'vocab_size': 300,
                 'generic_train_chars': 40_000, 'generic_val_chars': 2_000, 'generic_test_chars': 2_500,
                 'domain_train_chars': 40_000, 'domain_val_chars': 2_000, 'domain_test_chars': 2_500,
                 'eval_doc_chars': 1_200},
        'eval': {'tasks': ['copa', 'lambada_openai'], 'max_examples_per_task': 6, 'batch_size': 8},
        'inference': {'num_requests': 2, 'batch_sizes': [2], 'input_tokens': 8, 'output_tokens': 4},
        'progress': False, 'seeds': 2, 'seeds_other': 1, 'lr_sweep': [1e-3, 2e-3], 'lr_extend': 0,
        'jobs': 1,   # in-process training (the interruption below patches it); 'b' trains in 2 worker processes
    }
    block.update(changes)
    return StudyConfig.from_mapping(block)


@pytest.mark.slow
def test_reduced_study_end_to_end(text_dirs, tmp_path, monkeypatch):
    # --- a full run: results.json (schema 3), report.md, the plots, the cost section
    study = P.Study(small_config(text_dirs, tmp_path / 'a'))
    results = study.run()
    out = tmp_path / 'a'
    on_disk = json.loads((out / 'results.json').read_text())
    check_results(on_disk)
    assert on_disk == json.loads(json.dumps(results))
    assert on_disk['schema'] == 3 and on_disk['budgets'] == [0.5, 1.0] and len(on_disk['arms']) == 4
    ratio = on_disk['token_ratio']
    assert 0.3 < ratio < 1
    for arm in on_disk['arms']:
        n = 2 if arm['budget'] == 1.0 else 1
        assert arm['n_seeds'] == n == len(arm['per_seed']) and arm['seeds'] == [17 + i for i in range(n)]
        assert arm['steps'] >= 1 and arm['tokens'] == arm['train_tokens'] == arm['steps'] * 4 * SEQ
        assert arm['lr'] == on_disk['lr'][arm['arm']] and arm['lr'] in on_disk['lr']['sweep']['grids'][arm['arm']]
        assert arm['train_ce_metric'] == 'metrics/train/LanguageCrossEntropy'
        assert all(set(s['eval']['heldout']) == {'domain', 'generic'} for s in arm['per_seed'])
        assert math.isfinite(arm['eval']['ce_domain']) and math.isfinite(arm['train_ce_final'])
        assert arm['train_ce_window'] == T.tail_window(arm['steps']) and len(arm['loss_curve']) == arm['steps']
        assert set(arm['eval']['tasks']) == {'copa', 'lambada_openai'}
        assert arm['tokens_per_s'] > 0 and arm['step_time_s'] > 0 and arm['train_seconds'] > 0
        ces = [s['eval']['ce_domain'] for s in arm['per_seed']]
        assert arm['eval']['ce_domain'] == pytest.approx(sum(ces) / n)
        if n > 1:   # seeds differ (data order, router init), and the spread is recorded
            assert len(set(ces)) == n and arm['eval_std']['ce_domain'] > 0 and arm['eval_sem']['ce_domain'] > 0
    by = {(a['arm'], a['budget']): a for a in on_disk['arms']}
    for b in (0.5, 1.0):  # matched FLOPs: the upcycled arm sees fewer tokens, each costing more
        cpt, up = by[('cpt', b)], by[('upcycle', b)]
        assert up['tokens'] < cpt['tokens'] and up['flops_per_token'] > cpt['flops_per_token']
        assert up['total_params'] > up['active_params'] > cpt['active_params'] == cpt['total_params']
        step_flops = {a['arm']: a['train_flops'] / a['steps'] for a in (cpt, up)}
        budget = b * on_disk['dense']['pretrain_flops']
        for a in (cpt, up):                            # each arm within half a step of the budget's FLOPs
            assert abs(a['train_flops'] - budget) <= 0.5 * step_flops[a['arm']] + 1e-6 * budget
    assert by[('cpt', 1.0)]['tokens'] == on_disk['dense']['pretrain_tokens'] == 12 * 4 * SEQ
    up = by[('upcycle', 1.0)]
    assert 'lbl_final' in up and 'lbl_final' not in by[('cpt', 1.0)]
    # the upcycle_router_monitor callback ran in every upcycled run: per-layer expert load sums to 1
    for i in range(2):
        loads = [up['router'][f'layer{i}/load/expert{e}'][-1][1] for e in range(4)]
        assert sum(loads) == pytest.approx(1.0, abs=1e-4)
    assert up['per_seed'][0]['router_seed'] != up['per_seed'][1]['router_seed']
    # the lr sweep on the validation split at the smallest budget, checked at the largest
    sweep = on_disk['lr']['sweep']
    assert sweep['split'] == 'validation' and sweep['budget'] == 0.5 and set(sweep['chosen']) == {'cpt', 'upcycle'}
    assert sweep['check']['budget'] == 1.0 and set(sweep['check']['best']) == {'cpt', 'upcycle'}
    assert all(len(scores) >= 2 for scores in sweep['scores'].values())
    # verdicts: the paired test on the test split, with an interval; one seed at 0.5: no verdict
    c = on_disk['comparisons']['upcycle']['1']
    assert set(c) == {'ce_domain', 'ce_generic', 'core_average'} and c['ce_domain']['n_seeds'] == 2
    assert c['ce_domain']['ci'][0] <= c['ce_domain']['gap'] <= c['ce_domain']['ci'][1]
    assert c['ce_domain']['winner'] in ('upcycle', 'cpt', 'tie') and 'paired t' in c['ce_domain']['test']
    assert on_disk['comparisons']['upcycle']['0.5']['ce_domain']['winner'] == 'n/a'
    assert on_disk['eval_sets']['domain']['split'] == 'test' and on_disk['eval_sets']['domain']['documents'] >= 2
    assert on_disk['train_ce_metric'] == ['metrics/train/LanguageCrossEntropy']
    assert on_disk['regime']['base_tokens_per_param'] < 1 and not on_disk['regime']['tests_paper_claim']
    t = on_disk['timing']
    assert t['step_time_s']['cpt'] > 0 and t['ratio'] > 0 and isinstance(t['loaded'], bool)
    report = (out / 'report.md').read_text()
    for name in list(FIGURES.values()) + ['router.png']:
        assert (out / name).read_bytes().startswith(PNG_MAGIC), name
    assert (out / 'inference' / 'inference.json').is_file()
    assert '## Inference cost' in report and '## How this study ran' in report and '## Regime' in report
    assert f'{ratio:.3f}' in report and 'hellaswag' in report  # the token ratio; missing tasks are named
    lr_up = on_disk['lr']['upcycle']
    assert set(study.stages.ran) >= {'dense', 'arms/cpt-b0.5-lr0.001-s0', f'arms/upcycle-b1-lr{lr_up:g}-s1',
                                     'eval-ce/cpt-b0.5-lr0.002-s0', 'eval/dense', 'timing', 'inference'}

    # --- the same config and seed in another directory, cold, its phase-2 runs trained 2 at a time in worker
    # processes: the same results.json except wall-clock fields
    parallel = P.Study(small_config(text_dirs, tmp_path / 'b', jobs=2))
    again = parallel.run()
    assert without_wall_clock(again) == without_wall_clock(results)
    assert len(parallel.stages.ran_in_workers) >= 12 and parallel.stages.ran_in_workers <= set(parallel.stages.ran)
    assert again['wall_clock']['jobs'] == 2 and results['wall_clock']['jobs'] == 1
    assert without_wall_clock(json.loads((tmp_path / 'b' / 'results.json').read_text())) == without_wall_clock(on_disk)

    # --- a rerun skips every stage
    rerun = P.Study(small_config(text_dirs, out))
    assert without_wall_clock(rerun.run()) == without_wall_clock(results)
    assert rerun.stages.ran == [] and set(rerun.stages.skipped) == set(study.stages.ran)   # incl. timing, inference

    # --- a changed budget: interrupted mid-way, then resumed; only that budget's runs and evals are redone
    # (lrs fixed at the sweep's choice: the sweep itself would move to the new smallest budget)
    changed = small_config(text_dirs, out, budgets=[0.25, 1.0], lr_sweep=[], lr=results['lr']['cpt'],
                           upcycle_lr=results['lr']['upcycle'])
    real_train = T.train_run

    def interrupted(run_cfg, work, nproc, progress):
        raise KeyboardInterrupt('killed')
    monkeypatch.setattr(T, 'train_run', interrupted)
    with pytest.raises(KeyboardInterrupt):
        P.Study(changed).run()
    name = f'cpt-b0.25-lr{results["lr"]["cpt"]:g}-s0'
    assert not (out / 'arms' / name).exists() and list((out / 'arms').glob(f'.{name}.partial-*'))
    monkeypatch.setattr(T, 'train_run', real_train)
    resumed = P.Study(changed)
    results2 = resumed.run()
    assert f'arms/{name}' in resumed.stages.ran and all('-b0.25-' in n for n in resumed.stages.ran), resumed.stages.ran
    assert not list((out / 'arms').glob('.*partial*'))
    keep = [a for a in results2['arms'] if a['budget'] == 1.0]
    assert without_wall_clock({'arms': keep}) == without_wall_clock(
        {'arms': [a for a in results['arms'] if a['budget'] == 1.0]})
    assert json.loads((out / 'results.json').read_text())['budgets'] == [0.25, 1.0]


@pytest.mark.parametrize('changes, match', [
    ({'budgets': '0.1,abc'}, r"budgets: 'abc' is not a number"),
    ({'budgets': '0'}, r"budgets: '0' is not a budget"),
    ({'budgets': [0.5, 11]}, r'budgets: 11 is not a budget'),
    ({'budgets': '0.2,0.5,0.2'}, r"duplicate budget\(s\) \['0.2'\]"),
    ({'budget': [0.5]}, r"study config: unknown key\(s\) \['budget'\]"),
    ({'eval': {'local_data': 'auto', 'max_example': 3}}, r"eval: unknown key\(s\) \['max_example'\]"),
    ({'data': {'generic_dir': '/nonexistent/prose'}}, r'data.generic_dir: /nonexistent/prose does not exist'),
    ({'eval': {'local_data': '/nonexistent/local_data'}}, r'eval.local_data: /nonexistent/local_data is not a dir'),
    ({'scale': '7b'}, r"scale: '7b' is not one of"),
    ({'scale': '436m'}, r"scale 436m: \['mds_dir', 'tokenizer', 'dense_checkpoint'\] must be given"),
    ({'upcycle': {'top_k': 9}}, r'upcycle.top_k'),
    ({'model': {'expansion_ratio': 2.3}}, r'expansion_ratio must be an integer'),
    ({'jobs': 0}, r'jobs must be a positive integer, got 0'),
    ({'data': {'generic_code_fraction': 1.5}}, r'data.generic_code_fraction must be a number in \[0, 0.9\]'),
])
def test_bad_input_is_refused_before_any_training(text_dirs, tmp_path, changes, match):
    out = tmp_path / 'out'
    block = {'out': str(out), 'progress': False, **changes}
    with pytest.raises(ValueError, match=match):
        P.Study(StudyConfig.from_mapping(block)).run()
    made = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert made == [], made


def test_cli_errors_exit_2_and_name_the_problem(tmp_path, capsys):
    blocker = tmp_path / 'a-file'
    blocker.write_text('x')
    cases = [
        (['--budgets', '0.5,x'], "budgets: 'x' is not a number"),
        (['--generic-dir', str(tmp_path / 'missing')], f'{tmp_path / "missing"} does not exist'),
        (['--eval-data', str(tmp_path / 'nope')], f'eval.local_data: {tmp_path / "nope"} is not a directory'),
        (['--out', str(blocker / 'sub')], f'out: {blocker / "sub"} is not a writable directory'),
    ]
    for args, message in cases:
        argv = ['study', '--out', str(tmp_path / 'out')] + args if '--out' not in args else ['study'] + args
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith('error: ') and message in err, err
    assert not (tmp_path / 'out').exists()
    yaml = tmp_path / 'study.yaml'
    yaml.write_text('budgets: [0.1, 0.2]\nseedz: 3\n')
    assert cli_main(['study', '--config', str(yaml), '--out', str(tmp_path / 'out')]) == 2
    assert "unknown key(s) ['seedz']" in capsys.readouterr().err


def test_config_from_yaml_and_flags(tmp_path):
    from foundry_upcycle.cli import build_parser
    from foundry_upcycle.study.cli import config_from_args
    yaml = tmp_path / 'study.yaml'
    yaml.write_text('budgets: [0.1, 0.4]\nseed: 3\neval: {tasks: [copa], max_examples_per_task: 5}\n'
                    'data: {vocab_size: 512}\n')
    args = build_parser().parse_args(['study', '--config', str(yaml), '--seed', '5', '--budgets', '1,0.5',
                                      '--eval-examples', '7', '--skip-inference', '--out', str(tmp_path / 'o')])
    cfg = config_from_args(args)
    assert cfg.budgets == (0.5, 1.0) and cfg.seed == 5 and cfg.inference.skip
    assert cfg.eval.tasks == ('copa',) and cfg.eval.max_examples_per_task == 7 and cfg.data.vocab_size == 512
    assert parse_budgets('0.8, 0.1,1') == (0.1, 0.8, 1.0)
    default = config_from_args(build_parser().parse_args(['study']))
    assert default.budgets == (0.1, 0.2, 0.4) and default.out == 'runs/default'
    assert (default.seeds, default.seeds_other, default.threads, default.timing) == (3, 3, 1, True)
    assert default.lr_grid == (1.4e-3, 2.8e-3, 5.6e-3, 1.12e-2) and default.lr_check == 'up'
    check_paths(default.replace(out=str(tmp_path / 'default')))  # the shipped recipes and data sources are valid
    args = build_parser().parse_args(['study', '--lr-sweep', '5e-4,1e-3', '--router-weights', 'softmax', '--seeds',
                                      '4', '--pretrain-tokens-per-param', '16,64', '--no-timing', '--upcycle-lr', '2e-3'])
    cfg = config_from_args(args)
    assert cfg.lr_sweep == (5e-4, 1e-3) and cfg.upcycle == {'router_weights': 'softmax'} and cfg.seeds == 4
    assert cfg.regimes == (16.0, 64.0) and not cfg.timing and cfg.upcycle_lr == 2e-3
    under = config_from_args(build_parser().parse_args(['study', '--preset', 'undertrained', '--seeds', '1']))
    assert under.pretrain_steps == 600 and under.model['d_model'] == 128 and under.seeds == 1


def test_default_plan_is_the_papers_regime():
    """The default base is over-trained (>= 60 tokens per parameter), the recipes' phase-2 lrs sit below the
    pretraining peak, and the token ratio is the paper's 436M one; the under-trained preset is what it says."""
    from foundry_upcycle.study.config import PRESETS
    plan = P.Study(StudyConfig()).make_plan()
    assert plan.pretrain_tokens / plan.params['cpt'][0] >= 60
    assert all(lr < plan.pretrain_lr for lr in plan.lrs.values())
    assert 0.74 < plan.token_ratio < 0.8
    under = P.Study(StudyConfig.from_mapping(PRESETS['undertrained'])).make_plan()
    assert under.pretrain_tokens / under.params['cpt'][0] < 1
    with pytest.raises(ValueError, match='pretrain_steps or pretrain_tokens_per_param'):
        StudyConfig.from_mapping({'pretrain_steps': 10, 'pretrain_tokens_per_param': [64]})
    with pytest.raises(ValueError, match='router_weights'):
        StudyConfig.from_mapping({'upcycle': {'router_weights': 'sigmoid'}})
    softmax = P.Study(StudyConfig.from_mapping({'upcycle': {'router_weights': 'softmax'}})).make_plan()
    assert softmax.upcycle_block['router_weights'] == 'softmax'                    # the ablation reaches the block
    assert softmax.moe_model['ffn_config']['moe_normalize_expert_weights'] is None  # top-k weights not renormalised
    assert plan.moe_model['ffn_config']['moe_normalize_expert_weights'] == 1
    # the plan's steps: flops.matched_steps exactly (one function), e.g. 85 CPT / 66 upcycled steps at 0.1
    from foundry_upcycle.study.flops import matched_steps
    assert {k: v for k, v in plan.steps.items() if k[1] == 0.1} == {('cpt', 0.1): 85, ('upcycle', 0.1): 66}
    for b in plan_budgets(plan):
        assert (plan.steps[('cpt', b)], plan.steps[('upcycle', b)]) == matched_steps(
            plan.dense_model, plan.moe_model, b, plan.pretrain_tokens, plan.seq_len, plan.tokens_per_step)
    sixty_four = P.Study(StudyConfig.from_mapping({'pretrain_tokens_per_param': [64]})).make_plan()
    assert abs(sixty_four.pretrain_tokens / sixty_four.params['cpt'][0] - 64) < 1


def plan_budgets(plan) -> list[float]:
    return sorted({b for _, b in plan.steps})


def test_multi_process_runs_go_through_composers_launcher(tmp_path, monkeypatch):
    seen = {}

    class Done:
        returncode = 3

    def fake_run(cmd, **kwargs):
        seen.update(cmd=cmd, path=kwargs['env']['PATH'])
        return Done()
    monkeypatch.setattr(T.subprocess, "run", fake_run)
    with pytest.raises(RuntimeError, match='failed with exit code 3'):
        T.train_run({"run_name": "x", "max_duration": "1ba"}, tmp_path, nproc=2, progress=False)
    yaml = str(tmp_path / 'train.yaml')
    assert seen['cmd'][1:] == ['-m', 'composer.cli.launcher', '-n', '2', '-c', 'llmfoundry', 'train', yaml]
    assert seen['path'].split(':')[0] == str(Path(seen['cmd'][0]).parent)   # the venv's `llmfoundry` comes first
    assert 'run_name: x' in Path(yaml).read_text()


# ------------------------------------------------------------------------------------------- paper scale

PAPER = {'436m': (436e6, 1.6e9, 0.75), '1.4b': (1.4e9, 6.7e9, 0.68)}  # dense, upcycled total params, token ratio


def _meta_params(model_cfg: dict) -> int:
    from llmfoundry.utils.builders import build_composer_model
    cfg = copy.deepcopy(model_cfg)
    name = cfg.pop('name')
    cfg.update(init_device='meta', loss_fn='torch_crossentropy')   # the fused loss needs flash-attn (GPU)
    cfg['attn_config'] = {**cfg['attn_config'], 'attn_impl': 'torch'}
    model = build_composer_model(name=name, cfg=cfg, tokenizer=None)
    assert next(model.parameters()).device.type == 'meta'
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize('scale', ['436m', '1.4b'])
def test_paper_shapes_build_at_full_size(scale):
    from foundry_upcycle.study.flops import param_counts, token_ratio
    from foundry_upcycle.transforms import MODEL_NAME
    dense, moe = shipped_models(scale)
    moe = {**moe, 'name': MODEL_NAME}
    paper_dense, paper_moe, paper_ratio = PAPER[scale]
    n_dense, n_moe = _meta_params(dense), _meta_params(moe)
    assert n_dense == param_counts(dense)[0] and n_moe == param_counts(moe)[0]
    assert abs(n_dense / paper_dense - 1) < 0.03 and abs(n_moe / paper_moe - 1) < 0.03, (n_dense, n_moe)
    assert abs(token_ratio(dense, moe, 4096) - paper_ratio) < 0.01


def _cpu_dense_checkpoint(scale: str, vocab: int, path: Path) -> Path:
    """A dense 1-layer model of the scale's full width, saved as a weights-only Composer checkpoint."""
    from llmfoundry.models.mpt import ComposerMPTCausalLM
    from foundry_upcycle.checkpoint_io import save_composer_weights
    dense, _ = shipped_models(scale)
    cfg = {k: v for k, v in dense.items() if k != 'name'}
    cfg.update(n_layers=1, vocab_size=vocab, max_seq_len=SEQ, init_device='cpu', loss_fn='torch_crossentropy')
    cfg['attn_config'] = {**cfg['attn_config'], 'attn_impl': 'torch'}
    torch.manual_seed(0)
    save_composer_weights(ComposerMPTCausalLM(**cfg).state_dict(), str(path))
    return path


CPU_OVERRIDES = ('precision=fp32', 'fsdp_config=null', 'device_train_microbatch_size=2', 'device_eval_batch_size=2',
                 'train_loader.num_workers=0', 'train_loader.prefetch_factor=null', 'eval_loader.num_workers=0',
                 'eval_loader.prefetch_factor=null', 'train_loader.persistent_workers=false',
                 'eval_loader.persistent_workers=false', 'save_weights_only=true')


@pytest.mark.slow
@pytest.mark.parametrize('scale', ['436m'])
def test_paper_scale_study_trains_two_steps_on_cpu(scale, corpus, tmp_path):
    """The 436m recipes, overridden to CPU settings and one layer, through the whole study. The 1.4b recipes take
    the same path with wider layers (2 min more of CPU for no new code); test_paper_shapes_build_at_full_size
    builds them at their full shapes."""
    from transformers import AutoTokenizer
    vocab = 64 * math.ceil(len(AutoTokenizer.from_pretrained(str(corpus['tokenizer']))) / 64)
    dense = _cpu_dense_checkpoint(scale, vocab, tmp_path / 'dense.pt')
    cfg = StudyConfig.from_mapping({
        'out': str(tmp_path / 'study'), 'scale': scale, 'budgets': [1.0], 'progress': False,
        'mds_dir': str(corpus['domain']), 'generic_mds_dir': str(corpus['generic']),
        'tokenizer': str(corpus['tokenizer']), 'dense_checkpoint': str(dense), 'pretrain_tokens': 4 * 2 * SEQ,
        'max_seq_len': SEQ, 'global_batch_size': 2,
        'model': {'n_layers': 1, 'vocab_size': vocab, 'init_device': 'cpu', 'loss_fn': 'torch_crossentropy',
                  'attn_config': {'attn_impl': 'torch'}},
        'upcycle': {'backend': 'torch'}, 'train_overrides': list(CPU_OVERRIDES),
        'eval': {'local_data': None, 'batch_size': 4}, 'inference': {'skip': True}, 'seeds': 1, 'timing': False,
    })
    study = P.Study(cfg)
    results = study.run()
    check_results(results)
    steps = {a['arm']: a['steps'] for a in results['arms']}
    assert steps['cpt'] == 4 and steps['upcycle'] >= 2, steps     # FLOP-matched: fewer upcycled steps
    for arm in results['arms']:
        assert len(arm['loss_curve']) == arm['steps'] and math.isfinite(arm['eval']['ce_domain'])
        assert math.isfinite(arm['eval']['ce_generic'])
    train = next((tmp_path / 'study' / 'arms').glob('upcycle-b1-lr*-s0')).joinpath('train.yaml').read_text()
    assert f'd_model: {1024 if scale == "436m" else 2048}' in train and 'n_layers: 1' in train and 'upcycle:' in train
    assert results['dense']['eval']['ce_domain'] > 0 and results['missing_eval_tasks']
