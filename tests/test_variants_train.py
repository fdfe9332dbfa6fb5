"""Every variant of the `upcycle:` block under foundry's own train(): fine-grained experts, MoE on some blocks and
growing an MoE start from their source's step-0 eval CE (block and offline `convert` alike); Drop-Upcycling starts
from the re-drawn weights, not from CPT's CE; the router monitor covers each (E*G experts, MoE blocks only)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import logged, run_train, tiny_recipe
from foundry_upcycle.config import UpcycleConfig
from foundry_upcycle.convert import convert, offline_recipe
from foundry_upcycle.loggers import read_jsonl
from foundry_upcycle.reader import load_state_dict
from foundry_upcycle.upcycle import upcycle_state_dict

SPLITS = ('domain', 'generic')


def step0_ce(trainer) -> dict[str, float]:
    out = {}
    for split in SPLITS:
        (batch, ce), *_ = logged(trainer, f'metrics/eval/{split}/LanguageCrossEntropy')
        assert batch == 0
        out[split] = ce
    return out


def final_ce(trainer) -> dict[str, float]:
    return {s: logged(trainer, f'metrics/eval/{s}/LanguageCrossEntropy')[-1][1] for s in SPLITS}


def upcycle_run(corpus, source: Path, out: Path, block: dict, monitor: bool = True, **variables):
    cfg = tiny_recipe('tiny/upcycle.yaml', corpus, out, dense_checkpoint=str(source), **variables)
    cfg['upcycle'].update(block)
    if monitor:
        cfg['callbacks'] = {**(cfg.get('callbacks') or {}), 'upcycle_router_monitor': {'interval': 1}}
        cfg['loggers']['jsonl'] = {'path': str(out / 'metrics.jsonl')}
    return cfg


@pytest.fixture(scope='module')
def cpt_ce(corpus, dense_checkpoint, tmp_path_factory) -> dict[str, float]:
    out = tmp_path_factory.mktemp('cpt')
    trainer = run_train(tiny_recipe('tiny/cpt.yaml', corpus, out, dense_checkpoint=str(dense_checkpoint),
                                    max_duration='1ba'))
    ce = step0_ce(trainer)
    trainer.close()
    return ce


EXACT = {
    # name: (block, MoE blocks of the 2-block tiny model, experts per MoE block)
    'granular2': ({'num_experts': 4, 'top_k': 2, 'granularity': 2}, [0, 1], 8),
    'layers_last': ({'num_experts': 4, 'top_k': 2, 'moe_layers': [1]}, [1], 4),
    'granular4_every2': ({'num_experts': 2, 'top_k': 1, 'granularity': 4, 'moe_layers': 2}, [0], 8),
}


@pytest.mark.parametrize('name', sorted(EXACT))
def test_exact_variant_starts_at_cpt_ce(corpus, dense_checkpoint, cpt_ce, tmp_path, name):
    block, moe_blocks, experts = EXACT[name]
    cfg = upcycle_run(corpus, dense_checkpoint, tmp_path / 'block', block, max_duration='2ba')
    trainer = run_train(cfg)
    ce, loader = step0_ce(trainer), next(c for c in trainer.state.callbacks if type(c).__name__ == 'UpcycleLoader')
    trainer.close()
    assert loader.report['fresh_after_load'] is True
    print(f'\nstep-0 eval CE, {name}: {ce}; CPT: {cpt_ce}')
    for split in SPLITS:
        assert abs(ce[split] - cpt_ce[split]) < 1e-5, (name, split, ce[split], cpt_ce[split])
    # the router monitor: every expert of every MoE block (and only those), spread 0 for the fresh copies
    metrics = read_jsonl(tmp_path / 'block' / 'metrics.jsonl')
    layers = sorted({int(k.split('/')[1][5:]) for k in metrics if k.startswith('router/layer')})
    assert layers == moe_blocks
    for i in moe_blocks:
        loads = [dict(metrics[f'router/layer{i}/load/expert{e}'])[0] for e in range(experts)]
        assert math.isclose(sum(loads), 1.0, rel_tol=1e-6) and f'router/layer{i}/load/expert{experts}' not in metrics
        assert 0 < dict(metrics[f'router/layer{i}/entropy'])[0] <= math.log(experts) + 1e-6
        assert dict(metrics[f'router/layer{i}/expert_spread'])[0] == 0.0
    # the offline path: the same weights through `convert` and load_path
    moe = convert(str(dense_checkpoint), str(tmp_path / 'moe.pt'), UpcycleConfig.from_mapping(block))
    from omegaconf import OmegaConf as om
    from foundry_upcycle.transforms import apply_upcycle_block
    offline = upcycle_run(corpus, dense_checkpoint, tmp_path / 'offline', block, monitor=False, max_duration='1ba')
    offline = offline_recipe(apply_upcycle_block(om.to_container(om.create(offline), resolve=True)), str(moe))
    trainer = run_train(offline)
    for split, value in step0_ce(trainer).items():
        assert abs(value - ce[split]) < 1e-6, (split, value, ce[split])
    trainer.close()


def test_grow_starts_at_its_source_moe_ce(corpus, dense_checkpoint, tmp_path):
    """An MoE trained by the block (4 experts, top-1, 3 steps), grown x2 (8 experts, top-2) by the same block plus
    `grow: 2`: the grown model's step-0 CE is the source's final CE; the copies are exact, the experts trained."""
    block = {'num_experts': 4, 'top_k': 1}
    src_cfg = upcycle_run(corpus, dense_checkpoint, tmp_path / 'source', block, monitor=False, max_duration='3ba',
                          eval_interval='3ba', save_interval='3ba')
    trainer = run_train(src_cfg)
    source_ce = final_ce(trainer)
    trainer.close()
    moe_ckpt = tmp_path / 'source' / 'checkpoints' / 'ep0-ba3-rank0.pt'
    cfg = upcycle_run(corpus, moe_ckpt, tmp_path / 'grown', {**block, 'grow': 2}, max_duration='1ba')
    trainer = run_train(cfg)
    ce = step0_ce(trainer)
    loader = next(c for c in trainer.state.callbacks if type(c).__name__ == 'UpcycleLoader')
    ffn = trainer.state.model.model.transformer.blocks[0].ffn
    assert (ffn.experts.mlp.w1.shape[0] // 160, trainer.state.model.config.ffn_config['moe_top_k']) == (8, 2)
    trainer.close()
    assert loader.report['fresh_after_load'] is True
    print(f'\nstep-0 eval CE, grow 2: {ce}; source MoE: {source_ce}')
    for split in SPLITS:
        assert abs(ce[split] - source_ce[split]) < 1e-5, (split, ce[split], source_ce[split])
    metrics = read_jsonl(tmp_path / 'grown' / 'metrics.jsonl')
    assert dict(metrics['router/layer0/expert_spread'])[0] > 0      # trained experts: distinct pairs of copies
    # a grow on the dense checkpoint is refused by name, before any training
    with pytest.raises(ValueError, match=r'upcycle\.grow=2: block 0 of the checkpoint is dense'):
        run_train(upcycle_run(corpus, dense_checkpoint, tmp_path / 'bad', {**block, 'grow': 2}, monitor=False))
    assert [p for p in (tmp_path / 'bad').rglob('*') if p.is_file()] == []


def test_drop_upcycling_trains_from_the_redrawn_weights(corpus, dense_checkpoint, cpt_ce, tmp_path):
    """One batch at lr 0 (the recipe's 1-batch warm-up), so the weights after fit are the loaded ones: exactly the
    mapping's Drop-Upcycled experts; the step-0 CE is not CPT's (Drop-Upcycling is not function-preserving)."""
    block = {'num_experts': 4, 'top_k': 2, 'drop_ratio': 0.5, 'seed': 7}
    trainer = run_train(upcycle_run(corpus, dense_checkpoint, tmp_path / 'drop', block, max_duration='1ba'))
    ce = step0_ce(trainer)
    loader = next(c for c in trainer.state.callbacks if type(c).__name__ == 'UpcycleLoader')
    got = {k: v.detach().clone() for k, v in trainer.state.model.model.state_dict().items() if 'experts' in k}
    trainer.close()
    assert loader.report['fresh_after_load'] is None
    print(f'\nstep-0 eval CE, drop_ratio 0.5: {ce}; CPT: {cpt_ce}')
    assert max(abs(ce[s] - cpt_ce[s]) for s in SPLITS) > 1e-3, (ce, cpt_ce)   # exact variants: < 1e-5
    dense = load_state_dict(str(dense_checkpoint))
    want = upcycle_state_dict({k[len('model.'):]: v for k, v in dense.items()}, 4, seed=7, drop_ratio=0.5)
    for key, value in got.items():
        assert torch.equal(value, want[key]), key
    w1, gate = got['transformer.blocks.0.ffn.experts.mlp.w1'], dense['model.transformer.blocks.0.ffn.gate_proj.weight']
    changed = [(w1[e * 160:(e + 1) * 160] != gate).any(dim=1).sum().item() for e in range(4)]
    assert changed == [80] * 4
    spread0 = dict(read_jsonl(tmp_path / 'drop' / 'metrics.jsonl')['router/layer0/expert_spread'])[0]
    assert spread0 > 0.1


def test_hf_fine_grained_starts_at_cpt_ce_and_moe_layers_are_refused(corpus, tmp_path):
    """The same block on foundry's hf_causal_lm (a dense Llama directory -> transformers Mixtral): fine-grained
    experts start at CPT's CE; an MoE on some blocks is refused by name (Mixtral has an MoE in every block)."""
    from test_hf_upcycle import V, hf_recipe
    from test_import import save_dense
    dense_dir = tmp_path / 'llama'
    save_dense(dense_dir, vocab_size=V, max_shard_size='60KB')
    for f in corpus['tokenizer'].iterdir():
        (dense_dir / f.name).write_bytes(f.read_bytes())
    ce = {}
    for arm in ('cpt', 'upcycle'):
        cfg = hf_recipe(arm, dense_dir, corpus, tmp_path / arm, max_duration='1ba')
        if arm == 'upcycle':
            cfg['upcycle']['granularity'] = 2
        trainer = run_train(cfg)
        ce[arm] = step0_ce(trainer)
        if arm == 'upcycle':
            config = trainer.state.model.model.config
            assert (config.num_local_experts, config.num_experts_per_tok, config.intermediate_size) == (8, 4, 48)
        trainer.close()
    for split in SPLITS:
        assert abs(ce['cpt'][split] - ce['upcycle'][split]) < 1e-5, (split, ce)
    cfg = hf_recipe('upcycle', dense_dir, corpus, tmp_path / 'bad')
    cfg['upcycle']['moe_layers'] = 2
    with pytest.raises(ValueError, match=r'upcycle\.moe_layers=2: Mixtral holds a mixture of experts in every block'):
        run_train(cfg)


def test_hf_grow_a_trained_mixtral_starts_at_its_ce(corpus, tmp_path):
    """hf_causal_lm on a Mixtral directory (`pretrained_model_name_or_path`) with `grow: 2`: the grown Mixtral's
    step-0 CE is the source Mixtral's (evaluated by foundry's plain hf_causal_lm, the CPT recipe)."""
    from test_hf_upcycle import V, hf_recipe
    from test_import import save_dense
    from transformers import AutoModelForCausalLM
    from foundry_upcycle.export.hf_import import import_hf_to_mixtral
    save_dense(tmp_path / 'llama', vocab_size=V, max_shard_size='60KB')
    first = import_hf_to_mixtral(tmp_path / 'llama', tmp_path / 'moe', num_experts=4, top_k=1, progress=False).path
    mixtral = AutoModelForCausalLM.from_pretrained(str(first), torch_dtype=torch.float32)
    with torch.no_grad():
        for name, p in mixtral.named_parameters():
            if 'block_sparse_moe' in name:
                p.add_(torch.randn_like(p) * p.std())            # a trained-looking MoE: distinct experts
    source = tmp_path / 'mixtral'
    mixtral.save_pretrained(str(source))
    for f in corpus['tokenizer'].iterdir():
        (source / f.name).write_bytes(f.read_bytes())
    ce = {}
    for arm in ('cpt', 'upcycle'):
        cfg = hf_recipe(arm, source, corpus, tmp_path / arm, max_duration='1ba')
        if arm == 'upcycle':
            cfg['upcycle'].update(num_experts=4, top_k=1, grow=2)
        trainer = run_train(cfg)
        ce[arm] = step0_ce(trainer)
        if arm == 'upcycle':
            config = trainer.state.model.model.config
            assert (config.num_local_experts, config.num_experts_per_tok) == (8, 2)
        trainer.close()
    for split in SPLITS:
        assert abs(ce['cpt'][split] - ce['upcycle'][split]) < 1e-5, (split, ce)


def test_convert_cli_takes_the_variant_flags(dense_checkpoint, tmp_path, capsys):
    from foundry_upcycle.cli import main
    out = tmp_path / 'moe.safetensors'
    assert main(['convert', str(dense_checkpoint), '--out', str(out), '--num-experts', '4', '--top-k', '1',
                 '--granularity', '2', '--moe-layers', '1,']) == 0     # the list [1] ('1' is every block)
    sd = load_state_dict(str(out))
    assert 'model.transformer.blocks.0.ffn.up_proj.weight' in sd                   # block 0 stays dense
    assert sd['model.transformer.blocks.1.ffn.router.layer.weight'].shape[0] == 8  # 4 copies x 2 shards
    assert main(['convert', str(dense_checkpoint), '--out', str(tmp_path / 'x.pt'), '--moe-layers', '0,,x']) == 2
    assert '--moe-layers' in capsys.readouterr().err
    assert main(['convert', str(dense_checkpoint), '--out', str(tmp_path / 'y.pt'), '--grow', '2']) == 2
    assert 'upcycle.grow=2: block 0 of the checkpoint is dense' in capsys.readouterr().err
