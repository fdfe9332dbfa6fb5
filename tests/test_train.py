"""The `upcycle:` block under foundry's own train(): function preservation, losses, resume, bad input."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, SEQ, TINY_MODEL, logged, run_train, tiny_recipe
from foundry_upcycle.config import UpcycleConfig
from foundry_upcycle.convert import convert, offline_recipe
from foundry_upcycle.transforms import apply_upcycle_block
from foundry_upcycle.upcycle import expert_spread


def test_upcycle_step0_ce_equals_cpt(corpus, dense_checkpoint, tmp_path):
    """CPT, upcycling through the block, and upcycling through the offline converter start from the same CE."""
    ce = {}
    converted = convert(str(dense_checkpoint), str(tmp_path / 'moe.pt'), UpcycleConfig(num_experts=8, top_k=2))
    for arm in ('cpt', 'upcycle', 'offline'):
        recipe = 'tiny/cpt.yaml' if arm == 'cpt' else 'tiny/upcycle.yaml'
        cfg = tiny_recipe(recipe, corpus, tmp_path / arm, dense_checkpoint=str(dense_checkpoint))
        if arm == 'offline':
            from omegaconf import OmegaConf as om
            cfg = offline_recipe(apply_upcycle_block(om.to_container(om.create(cfg), resolve=True)), str(converted))
        trainer = run_train(cfg)
        ce[arm] = {k: logged(trainer, f'metrics/eval/{k}/LanguageCrossEntropy') for k in ('domain', 'generic')}
        ce[arm]['train'] = logged(trainer, 'loss/train/loss' if arm == 'upcycle' else 'loss/train/total')
        ce[arm]['lbl'] = logged(trainer, 'loss/train/lbl')
        ce[arm]['total'] = logged(trainer, 'loss/train/total')
        trainer.close()
    for split in ('domain', 'generic'):
        (b0, cpt0), (b1, up0), (b2, off0) = ce['cpt'][split][0], ce['upcycle'][split][0], ce['offline'][split][0]
        assert b0 == b1 == b2 == 0
        assert abs(cpt0 - up0) < 1e-5 and abs(cpt0 - off0) < 1e-5, (split, cpt0, up0, off0)
    # First training batch: same data, same weights -> the same language loss; the LBL is reported apart.
    assert abs(ce['cpt']['train'][0][1] - ce['upcycle']['train'][0][1]) < 1e-5
    assert not ce['cpt']['lbl'] and ce['upcycle']['lbl']
    lbl0 = ce['upcycle']['lbl'][0][1]
    assert 0.01 * 0.9 < lbl0 < 0.01 * 8  # weight x (1 for uniform routing ... E for collapse)
    assert abs(ce['upcycle']['total'][0][1] - ce['upcycle']['train'][0][1] - lbl0) < 1e-5


class _Marker:
    """Unpickling this touches a file: proof that a loader ran arbitrary pickled code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _bad_checkpoints(dense_checkpoint: Path, tmp: Path) -> dict[str, Path]:
    garbage = tmp / 'garbage.pt'
    garbage.write_bytes(b'not a checkpoint')
    moe = convert(str(dense_checkpoint), str(tmp / 'already_moe.pt'), UpcycleConfig(num_experts=4))
    evil = tmp / 'evil.pt'
    state = torch.load(dense_checkpoint, weights_only=False)  # our own test file
    state['state']['extra'] = _Marker(str(tmp / 'pwned'))
    torch.save(state, evil)
    skewed = tmp / 'skewed.pt'
    state = torch.load(dense_checkpoint, weights_only=False)  # our own test file
    key = 'model.transformer.blocks.1.ffn.down_proj.weight'
    state['state']['model'][key] = state['state']['model'][key][:, :-1].clone()  # [D, F-1] against up [F, D]
    torch.save(state, skewed)
    return {'garbage': garbage, 'moe': moe, 'evil': evil, 'skewed': skewed}


SOURCE = r"upcycle\.from \(or the recipe's load_path\) \S*"  # every loader error names the key and the file
BAD = [
    # (name, recipe changes, expected message)
    ('missing file', {'dense_checkpoint': '/nonexistent/dense.pt'}, '/nonexistent/dense.pt does not exist'),
    ('unreadable', {'dense_checkpoint': 'garbage'}, 'garbage.pt is not a readable torch checkpoint'),
    ('already MoE', {'dense_checkpoint': 'moe'}, rf'{SOURCE}already_moe\.pt: block 0 already has a mixture-of-experts'),
    ('inconsistent FFN shapes', {'dense_checkpoint': 'skewed'}, rf'{SOURCE}skewed\.pt: block 1: inconsistent FFN shapes'),
    ('pickled code', {'dense_checkpoint': 'evil'}, 'refusing to unpickle'),
    ('shape mismatch', {'model.expansion_ratio': 3},
     rf'{SOURCE}ep0-ba4-rank0\.pt: .*ffn\.experts\.mlp\.w1 has shape \(1280, 64\).*expects \(1536, 64\)'),
    ('unknown key', {'upcycle.num_expert': 4}, r"unknown key\(s\) \['num_expert'\]"),
    ('top_k > E', {'upcycle.top_k': 9}, 'upcycle.top_k'),
    ('E < 2', {'upcycle.num_experts': 1}, 'upcycle.num_experts'),
    ('ffn_config contradiction', {'model.ffn_config.moe_top_k': 1}, 'model.ffn_config.moe_top_k'),
    ('FFN biases', {'model.no_bias': False}, 'model.no_bias'),
]


@pytest.mark.parametrize('name, change, match', BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_refused_before_writing(corpus, dense_checkpoint, tmp_path_factory, name, change, match):
    tmp = tmp_path_factory.mktemp('bad')
    bad = _bad_checkpoints(dense_checkpoint, tmp)
    ckpt = change.get('dense_checkpoint', str(dense_checkpoint))
    cfg = tiny_recipe('tiny/upcycle.yaml', corpus, tmp / 'run', dense_checkpoint=str(bad.get(ckpt, ckpt)))
    for key, value in change.items():
        if key != 'dense_checkpoint':
            *path, leaf = key.split('.')
            node = cfg
            for part in path:
                node = node[part]
            node[leaf] = value
    with pytest.raises(ValueError, match=match):
        run_train(cfg)
    written = [p for p in (tmp / 'run').rglob('*') if p.is_file()] if (tmp / 'run').exists() else []
    assert written == []
    assert not (tmp / 'pwned').exists()


def _cli_args(corpus, out: Path, **variables) -> list[str]:
    v = {'data_dir': corpus['domain'], 'eval_data_dir': corpus['generic'], 'tokenizer': corpus['tokenizer'],
         'save_folder': out / 'checkpoints', 'run_name': out.name, 'max_seq_len': SEQ, 'global_batch_size': 4,
         'warmup': '1ba', **variables}
    args = [f'variables.{k}={val}' for k, val in v.items()]
    args += [f'model.{k}={val}' for k, val in TINY_MODEL.items()]
    args += ['model.attn_config.kv_n_heads=2', 'device_eval_batch_size=8', 'console_log_interval=1ba',
             f'loggers.jsonl.path={out}/metrics.jsonl']
    return args


def _env():
    path = f'{Path(sys.executable).parent}{os.pathsep}{os.environ.get("PATH", "")}'  # the venv's llmfoundry
    return {**os.environ, 'PATH': path, 'PYTHONUNBUFFERED': '1', 'HF_HUB_OFFLINE': '1', 'TRANSFORMERS_OFFLINE': '1'}


@pytest.mark.slow
def test_killed_run_resumes_from_its_own_moe_checkpoint(corpus, dense_checkpoint, tmp_path):
    out = tmp_path / 'run'
    cmd = [sys.executable, '-m', 'llmfoundry.cli.cli', 'train', str(REPO / 'yamls/tiny/upcycle.yaml'),
           *_cli_args(corpus, out, dense_checkpoint=dense_checkpoint, max_duration='30ba', save_interval='4ba',
                      eval_interval='30ba')]
    latest = out / 'checkpoints' / 'latest-rank0.pt'
    log1 = open(tmp_path / 'first.log', 'w')
    proc = subprocess.Popen(cmd, stdout=log1, stderr=subprocess.STDOUT, env=_env(), cwd=tmp_path)
    deadline = time.time() + 300
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, 'the first run ended before it could be killed'
    first = (tmp_path / 'first.log').read_text()
    assert 'after load at batch 0, experts are identical copies' in first, first[-3000:]
    saved = torch.load(latest, weights_only=False)['state']  # our own test file
    killed_at = saved['timestamp']['Timestamp']['batch']
    assert 0 < killed_at < 30
    trained_w1 = saved['model']['model.transformer.blocks.0.ffn.experts.mlp.w1']
    assert expert_spread(trained_w1, 8) > 0, 'the checkpoint should hold trained (diverged) experts'

    second = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    log2 = second.stdout + second.stderr
    (tmp_path / 'second.log').write_text(log2)
    assert f'after load at batch {killed_at}, experts are distinct (trained weights)' in log2, log2[-3000:]
    assert (out / 'checkpoints' / 'ep0-ba30-rank0.pt').exists() or any(
        p.name.endswith('ba30-rank0.pt') for p in (out / 'checkpoints').iterdir())


# Two processes vs one (eval CE, losses, LBL, parameters after training) for DDP and FSDP2: tests/test_distributed.py.


def _numpy1_checkpoint(dense_checkpoint: Path, out: Path) -> Path:
    """The dense checkpoint re-saved as numpy 1.x + Composer wrote it: the RNG state's arrays pickled under the old
    module name `numpy.core.multiarray._reconstruct` (torch's legacy format pickles with protocol 2, so the global
    is a plain text line we can rename)."""
    import numpy as np
    state = torch.load(dense_checkpoint, weights_only=False)  # our own test file
    state['rng'] = [{'numpy': np.random.get_state()}]
    raw = out / 'raw.pt'
    torch.save(state, raw, _use_new_zipfile_serialization=False)
    data = raw.read_bytes()
    new, old = b'numpy._core.multiarray\n_reconstruct', b'numpy.core.multiarray\n_reconstruct'
    assert new in data
    (out / 'numpy1.pt').write_bytes(data.replace(new, old))
    return out / 'numpy1.pt'


def test_numpy1_rng_state_is_allowed(dense_checkpoint, tmp_path):
    """Issue 8 defect 9: Composer (weights_only=False) loads a numpy-1.x checkpoint; so must our weights-only reader."""
    from foundry_upcycle.checkpoint_io import load_state_dict
    ckpt = _numpy1_checkpoint(dense_checkpoint, tmp_path)
    assert b'numpy._core.multiarray' not in ckpt.read_bytes()
    composer_view = torch.load(ckpt, weights_only=False)  # what Composer's own loader does
    assert composer_view['rng'][0]['numpy'][1].dtype.name == 'uint32'
    ours = load_state_dict(str(ckpt), 'upcycle.from')
    reference = load_state_dict(str(dense_checkpoint), 'upcycle.from')
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[k], reference[k]) for k in ours)


def test_mmap_read_equals_full_read(dense_checkpoint):
    from foundry_upcycle.checkpoint_io import load_state_dict
    full, mapped = load_state_dict(str(dense_checkpoint)), load_state_dict(str(dense_checkpoint), mmap=True)
    assert full.keys() == mapped.keys() and all(torch.equal(full[k], mapped[k]) for k in full)


def _megablocks_lbl(router_logits: list[torch.Tensor], num_experts: int, top_k: int, weight: float) -> torch.Tensor:
    """megablocks.layers.moe.batched_load_balancing_loss (databricks/megablocks), written out: per layer the router
    scores are softmax(logits) and tokens_per_expert the histogram of the top-k indices; the layers are concatenated
    and scaled by weight * E / (L * T * K)."""
    tokens_per_expert, expert_scores = [], []
    for logits in router_logits:  # [T, E] per layer
        scores = logits.softmax(dim=-1)
        _, indices = torch.topk(scores, top_k, dim=-1)
        tokens_per_expert.append(torch.histc(indices.flatten().float(), bins=num_experts, min=0, max=num_experts - 1))
        expert_scores.append(scores)
    num_layers, tokens = len(router_logits), expert_scores[0].shape[0]
    scores = torch.cat(expert_scores, dim=1).float().mean(dim=0)
    scale = num_experts * weight / (num_layers * tokens * top_k)
    return scale * torch.dot(torch.cat(tokens_per_expert).to(scores.dtype), scores)


def test_multilayer_lbl_and_zloss_match_reference_formulas():
    """The model's LBL over 3 MoE layers equals MegaBlocks' batched formula; its z-loss the ST-MoE one."""
    from llmfoundry.utils.builders import build_composer_model
    from foundry_upcycle.transforms import upcycled_model_config
    dense = {'name': 'mpt_causal_lm', **TINY_MODEL, 'n_layers': 3, 'no_bias': True, 'init_device': 'cpu',
             'attn_config': {'attn_impl': 'torch'}, 'ffn_config': {'ffn_type': 'mptglu'}, 'loss_fn': 'torch_crossentropy'}
    ucfg = UpcycleConfig(num_experts=4, top_k=2, load_balancing_loss_weight=0.05, zloss_weight=0.003,
                         router_init_std=0.5)  # a wide router, so routing is far from uniform
    cfg = upcycled_model_config(dense, ucfg, 'torch')
    torch.manual_seed(0)
    model = build_composer_model(name=cfg.pop('name'), cfg=cfg, tokenizer=None)
    recorded = []
    routers = [m for n, m in model.named_modules() if n.endswith('ffn.router.layer')]
    assert len(routers) == 3
    for router in routers:
        router.register_forward_hook(lambda m, i, out: recorded.append(out.detach()))
    batch = {'input_ids': torch.randint(0, TINY_MODEL['vocab_size'], (3, SEQ))}
    batch['labels'] = batch['input_ids'].clone()
    model.train()
    losses = model.loss(model(batch), batch)
    assert len(recorded) == 3 and recorded[0].shape == (3 * SEQ, 4)
    expected_lbl = _megablocks_lbl(recorded, 4, 2, 0.05)
    expected_z = 0.003 * torch.stack([torch.logsumexp(x, dim=-1).square().mean() for x in recorded]).mean()
    assert abs(expected_lbl.item() - 0.05) > 1e-3  # not the uniform-routing value: the check sees the routing
    torch.testing.assert_close(losses['lbl'].detach(), expected_lbl, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(losses['router_zloss'].detach(), expected_z, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(losses['total'], losses['loss'] + losses['lbl'] + losses['router_zloss'])
    losses['total'].backward()
    assert all(r.weight.grad is not None and r.weight.grad.abs().sum() > 0 for r in routers)
