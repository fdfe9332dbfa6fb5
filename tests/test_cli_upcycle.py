"""`foundry-upcycle convert` / `expand` through the CLI, and `router_weights: softmax` end to end.

Black-box: recipes go through foundry's train() or the CLI's `main` (and the installed console script once); what
comes out is read with torch / safetensors / OmegaConf and compared with the dense checkpoint or the transform.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf as om
from safetensors.torch import load_file

from conftest import TINY_MODEL, YAMLS, run_train, tiny_recipe
from foundry_upcycle.cli import main
from foundry_upcycle.transforms import apply_upcycle_block

RECIPE = str(YAMLS / 'tiny' / 'upcycle.yaml')
E, K = 8, 2
SOFTMAX = {'router_weights': 'softmax', 'seed': 3, 'router_init_std': 0.05}  # not the defaults: ignoring one shows
BLOCK = 'model.transformer.blocks.{}.ffn.{}'


def _dense(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=False)['state']['model']  # our own test file (a Composer checkpoint)


def _recipe_args(dense: Path, tmp: Path, **upcycle) -> list[str]:
    """Dotlist overrides that make yamls/tiny/upcycle.yaml describe the test's tiny dense model."""
    vocab = _dense(dense)['model.transformer.wte.weight'].shape[0]
    args = [f'variables.dense_checkpoint={dense}', f'variables.save_folder={tmp / "save"}', 'variables.run_name=r']
    args += [f'model.{k}={v}' for k, v in {**TINY_MODEL, 'vocab_size': vocab}.items()]
    args += ['model.attn_config.kv_n_heads=2'] + [f'upcycle.{k}={v}' for k, v in upcycle.items()]
    return args


def _check_tiled(moe: dict[str, torch.Tensor], dense: dict[str, torch.Tensor], experts: int, scale: float):
    """Every expert is the dense FFN: w1 = gate, v1 = up, w2 = down^T * scale, each tiled [experts*F, D]."""
    for i in range(TINY_MODEL['n_layers']):
        d = {k: dense[BLOCK.format(i, f'{k}_proj.weight')] for k in ('gate', 'up', 'down')}
        want = {'w1': d['gate'].repeat(experts, 1), 'v1': d['up'].repeat(experts, 1),
                'w2': d['down'].T.repeat(experts, 1) * scale}
        for name, w in want.items():
            torch.testing.assert_close(moe[BLOCK.format(i, f'experts.mlp.{name}')], w, rtol=1e-6, atol=0,
                                       msg=lambda m: f'block {i} {name}: {m}')


def test_softmax_router_weights_through_train_and_convert_cli(corpus, dense_checkpoint, tmp_path):
    """`router_weights: softmax` folds E/K into every expert's w2, both in the block's loader (one batch of
    yamls/tiny/upcycle.yaml under foundry's train, at lr 0: batch 0 is the warm-up's first) and in
    `foundry-upcycle convert --recipe` (the installed console script); the two produce the same tensors."""
    cfg = tiny_recipe('tiny/upcycle.yaml', corpus, tmp_path / 'run', dense_checkpoint=str(dense_checkpoint),
                      max_duration='1ba', eval_interval='1ba', save_interval='1ba', warmup='1ba')
    cfg['upcycle'].update(SOFTMAX)
    cfg['eval_first'] = False
    trainer = run_train(cfg)
    assert trainer.state.model.config.ffn_config['moe_normalize_expert_weights'] is None
    loaded = {k: v.detach().clone() for k, v in trainer.state.model.state_dict().items()}
    trainer.close()
    dense = _dense(dense_checkpoint)
    _check_tiled(loaded, dense, E, E / K)

    out = tmp_path / 'moe.safetensors'
    exe = Path(sys.executable).parent / 'foundry-upcycle'   # the console script, except in the device rehearsal:
    rehearsal = os.environ.get('FOUNDRY_UPCYCLE_REHEARSE_GPU_TRAIN') == '1'   # its --target install has no scripts
    assert exe.exists() or rehearsal, f'{exe}: the console script is not installed'
    cmd = [str(exe)] if exe.exists() else [sys.executable, '-m', 'foundry_upcycle.cli']
    run = subprocess.run([*cmd, 'convert', str(dense_checkpoint), '--out', str(out), '--recipe', RECIPE, '--set',
                          *_recipe_args(dense_checkpoint, tmp_path, **SOFTMAX)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    converted = load_file(str(out))
    _check_tiled(converted, dense, E, E / K)
    assert converted.keys() == loaded.keys()
    for key in converted:  # the router too: same seed and std as the loader (the block's keys reach both)
        torch.testing.assert_close(converted[key], loaded[key], rtol=0, atol=0, msg=lambda m: f'{key}: {m}')
    router = converted[BLOCK.format(0, 'router.layer.weight')]
    assert 0.04 < router.std().item() < 0.06  # router_init_std 0.05, [8, 64] samples (not the default 0.02)


def test_convert_cli_flags_override_the_recipe_block(dense_checkpoint, tmp_path):
    """`--num-experts/--top-k/--seed/--router-init-std` equal the same keys set in the recipe's block; softmax
    scales w2 by the new E/K; another seed gives another router."""
    args = ['convert', str(dense_checkpoint), '--recipe', RECIPE]
    common = _recipe_args(dense_checkpoint, tmp_path, router_weights='softmax')
    flags = ['--num-experts', '4', '--top-k', '1', '--seed', '5', '--router-init-std', '0.1']
    assert main([*args, '--out', str(tmp_path / 'flags.safetensors'), *flags, '--set', *common]) == 0
    block = _recipe_args(dense_checkpoint, tmp_path, router_weights='softmax', num_experts=4, top_k=1, seed=5,
                         router_init_std=0.1)
    assert main([*args, '--out', str(tmp_path / 'block.safetensors'), '--set', *block]) == 0
    assert main([*args, '--out', str(tmp_path / 'seed6.safetensors'), '--seed', '6', *flags[:4], '--set', *common]) == 0
    by_flags, by_block = load_file(str(tmp_path / 'flags.safetensors')), load_file(str(tmp_path / 'block.safetensors'))
    assert by_flags.keys() == by_block.keys()
    for key in by_flags:
        assert torch.equal(by_flags[key], by_block[key]), key
    _check_tiled(by_flags, _dense(dense_checkpoint), 4, 4 / 1)
    router = BLOCK.format(0, 'router.layer.weight')
    assert by_flags[router].shape[0] == 4 and not torch.equal(load_file(str(tmp_path / 'seed6.safetensors'))[router],
                                                               by_flags[router])


def test_expand_cli_equals_the_transform(tmp_path, capsys):
    """`foundry-upcycle expand` prints (or writes) exactly what foundry's config transform makes of the recipe with
    the overrides; `--offline-checkpoint` swaps the loader callback for load_path."""
    dense = tmp_path / 'dense.pt'
    dense.write_bytes(b'')
    args = [f'variables.dense_checkpoint={dense}', f'variables.save_folder={tmp_path / "s"}', 'variables.run_name=r',
            'upcycle.num_experts=4', 'upcycle.top_k=1', 'upcycle.router_weights=softmax', 'model.d_model=48']
    want = apply_upcycle_block(om.to_container(om.merge(om.load(RECIPE), om.from_cli(args)), resolve=True))
    assert main(['expand', RECIPE, *args]) == 0
    printed = om.to_container(om.create(capsys.readouterr().out))
    assert main(['expand', RECIPE, *args, '--out', str(tmp_path / 'x.yaml')]) == 0
    assert printed == om.to_container(om.load(tmp_path / 'x.yaml')) == want
    ffn, loader = printed['model']['ffn_config'], printed['callbacks']['upcycle_loader']
    assert printed['model']['d_model'] == 48 and printed['model']['name'] == 'mpt_upcycle_causal_lm'
    assert (ffn['moe_num_experts'], ffn['moe_top_k'], ffn['moe_normalize_expert_weights']) == (4, 1, None)
    assert loader['source'] == str(dense) and loader['num_experts'] == 4 and loader['expert_output_scale'] == 4.0
    assert 'upcycle' not in printed and 'load_path' not in printed
    assert main(['expand', RECIPE, *args, '--offline-checkpoint', 'moe.pt']) == 0
    offline = om.to_container(om.create(capsys.readouterr().out))
    assert 'upcycle_loader' not in offline['callbacks'] and offline['load_path'] == 'moe.pt'
    assert offline['load_weights_only'] is True and offline['model'] == printed['model']


BAD = [  # (subcommand, dotlist override or flags, what the error must name)
    ('expand', ['upcycle.num_expert=4'], r"unknown key\(s\) \['num_expert'\]"),
    ('convert', ['upcycle.top_kk=1'], r"unknown key\(s\) \['top_kk'\]"),
    ('convert', ['upcycle.router_weights=sigmoid'], 'upcycle.router_weights'),
    ('expand', ['model.ffn_config.moe_top_k=1'], 'model.ffn_config.moe_top_k'),
    ('convert', ['model.d_model=48'], r'ffn\.experts\.mlp\.w1 is \(1280, 64\) but the recipe expects \(960, 48\)'),
    ('convert', ['variables.dense_checkpoint=???'], 'variables.dense_checkpoint'),
]


@pytest.mark.parametrize('command, change, match', BAD, ids=[f'{b[0]}-{b[1][0]}' for b in BAD])
def test_cli_refuses_a_bad_recipe_naming_the_key(dense_checkpoint, tmp_path, capsys, command, change, match):
    import re
    out = tmp_path / 'out.safetensors'
    recipe_args = _recipe_args(dense_checkpoint, tmp_path) + change
    if command == 'convert':
        argv = ['convert', str(dense_checkpoint), '--out', str(out), '--recipe', RECIPE, '--set', *recipe_args]
    else:
        argv = ['expand', RECIPE, *recipe_args, '--out', str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and re.search(match, err), err
    assert list(tmp_path.iterdir()) == []  # nothing written
