"""Where each variant exports and serves: fine-grained and grown MoEs to Mixtral and DBRX (logit parity with the
MPT and, for fresh fine-grained experts, with the dense model), MoE on some blocks refused by both (naming the
key); the Hugging Face path (`import-hf`): fine-grained Llama -> Mixtral, Mixtral grown, moe_layers refused."""
from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')

from test_export import build, max_diff, mpt_cfg
from test_import import dense  # noqa: F401  (fixture: a sharded dense Llama)
from test_import import ids as hf_ids
from test_import import logits as hf_logits

from foundry_upcycle.config import UpcycleConfig, moe_model_fields
from foundry_upcycle.export.hf_export import check_target, export_state_dict
from foundry_upcycle.export.hf_import import import_hf_to_mixtral
from foundry_upcycle.upcycle import upcycle_state_dict

TOL = 1e-4


def _moe(dense_cfg, dense_model, ucfg: UpcycleConfig, foundry_cls):
    from foundry_upcycle.model import ComposerMPTUpcycleCausalLM
    cfg = {**dense_cfg, **moe_model_fields(dense_cfg, ucfg, 'torch')}
    w = ucfg.weights()
    sd = upcycle_state_dict(dense_model.state_dict(), w.num_experts, granularity=w.granularity, grow=w.grow,
                            moe_layers=w.moe_layers)
    torch.manual_seed(0)
    model = ComposerMPTUpcycleCausalLM(loss_fn='torch_crossentropy',
                                       **{k: v for k, v in cfg.items() if k != 'name'}).eval()
    model.load_state_dict(sd)
    return cfg, model


@pytest.fixture(scope='module')
def foundry():
    from llmfoundry.models.mpt import ComposerMPTCausalLM
    return ComposerMPTCausalLM


@pytest.mark.parametrize('norm, target, arch', [('rmsnorm', 'mixtral', 'MixtralForCausalLM'),
                                                ('low_precision_layernorm', 'dbrx', 'DbrxForCausalLM')])
def test_fine_grained_exports_and_keeps_the_dense_function(foundry, tmp_path, norm, target, arch):
    dense_cfg = mpt_cfg(norm=norm)
    dense_model = build(foundry, dense_cfg)
    cfg, moe = _moe(dense_cfg, dense_model, UpcycleConfig(num_experts=4, top_k=2, granularity=2), foundry)
    out = export_state_dict(moe.state_dict(), cfg, tmp_path / 'hf', target=target, progress=False)
    hf, diff = max_diff(moe, out)
    assert type(hf).__name__ == arch and diff <= TOL
    _, to_dense = max_diff(dense_model, out)
    assert to_dense <= TOL, 'fresh fine-grained experts compute the dense model, exported too'
    c = json.loads((out / 'config.json').read_text())
    got = (c['num_local_experts'], c['num_experts_per_tok'], c['intermediate_size']) if target == 'mixtral' else \
        (c['ffn_config']['moe_num_experts'], c['ffn_config']['moe_top_k'], c['ffn_config']['ffn_hidden_size'])
    assert got == (8, 4, 48)


def test_grown_moe_exports_to_mixtral(foundry, tmp_path):
    cfg = mpt_cfg(ffn={'ffn_type': 'torch_dmoe', 'moe_num_experts': 4, 'moe_top_k': 1, 'mlp_type': 'glu',
                       'ffn_act_fn': {'name': 'silu'}, 'moe_normalize_expert_weights': 1, 'moe_jitter_eps': None,
                       'uniform_expert_assignment': False, 'ffn_hidden_size': 96})
    source = build(foundry, cfg)                         # trained-looking: distinct experts, decisive router
    dense_cfg = mpt_cfg()
    grown_cfg = {**dense_cfg, **moe_model_fields(dense_cfg, UpcycleConfig(num_experts=4, top_k=1, grow=2), 'torch')}
    grown_sd = upcycle_state_dict(source.state_dict(), 4, grow=2)
    out = export_state_dict(grown_sd, grown_cfg, tmp_path / 'hf', target='mixtral', progress=False)
    _, diff = max_diff(source, out)
    assert diff <= TOL
    assert json.loads((out / 'config.json').read_text())['num_experts_per_tok'] == 2


@pytest.mark.parametrize('target', ['mixtral', 'dbrx', 'auto'])
def test_moe_on_some_blocks_is_refused_by_every_moe_target(target):
    norm = 'low_precision_layernorm' if target == 'dbrx' else 'rmsnorm'
    dense_cfg = mpt_cfg(norm=norm)
    cfg = {**dense_cfg, **moe_model_fields(dense_cfg, UpcycleConfig(num_experts=4, moe_layers=[1]), 'torch')}
    with pytest.raises(ValueError, match=r'moe_layers: \[1\]: dense blocks among MoE blocks'):
        check_target(cfg, target)


def test_import_hf_fine_grained_keeps_the_dense_function(dense, tmp_path):  # noqa: F811
    src, model = dense
    out = import_hf_to_mixtral(src, tmp_path / 'moe', num_experts=2, top_k=1, granularity=4, progress=False).path
    cfg = json.loads((out / 'config.json').read_text())
    assert (cfg['num_local_experts'], cfg['num_experts_per_tok'], cfg['intermediate_size']) == (8, 4, 24)
    x = hf_ids()
    mixtral, got = hf_logits(out, x)
    _, ref = hf_logits(model, x)
    assert (got - ref).abs().max().item() <= TOL
    moe, mlp = mixtral.model.layers[0].block_sparse_moe, model.model.layers[0].mlp
    assert torch.equal(moe.experts[5].w1.weight, mlp.gate_proj.weight[24:48])          # expert 5 = copy 1, shard 1
    assert torch.allclose(moe.experts[5].w2.weight, 4 * mlp.down_proj.weight[:, 24:48])  # only down is scaled
    assert torch.equal(moe.gate.weight[4], moe.gate.weight[7])                           # one virtual group


def test_import_hf_grows_a_mixtral(dense, tmp_path):  # noqa: F811
    src, _ = dense
    first = import_hf_to_mixtral(src, tmp_path / 'moe', num_experts=4, top_k=1, progress=False).path
    from transformers import AutoModelForCausalLM
    trained = AutoModelForCausalLM.from_pretrained(str(first), torch_dtype=torch.float32)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if 'block_sparse_moe' in name:
                p.add_(torch.randn_like(p) * p.std())
    trained.save_pretrained(str(tmp_path / 'trained'))
    x = hf_ids()
    _, ref = hf_logits(trained, x)
    with pytest.raises(ValueError, match='already a Mixtral: set upcycle.grow'):
        import_hf_to_mixtral(tmp_path / 'trained', tmp_path / 'bad', num_experts=4, top_k=1, progress=False)
    grown = import_hf_to_mixtral(tmp_path / 'trained', tmp_path / 'grown', num_experts=4, top_k=1, grow=2,
                                 progress=False).path
    cfg = json.loads((grown / 'config.json').read_text())
    assert (cfg['num_local_experts'], cfg['num_experts_per_tok']) == (8, 2)
    _, got = hf_logits(grown, x)
    assert (got - ref).abs().max().item() <= TOL


def test_mixtral_mapping_refuses_moe_on_some_blocks(dense, tmp_path):  # noqa: F811
    src, _ = dense
    from foundry_upcycle.llama_to_mixtral import hf_upcycle_jobs
    from foundry_upcycle.reader import open_source
    opts = UpcycleConfig(num_experts=4, moe_layers=2).weights()
    with pytest.raises(ValueError, match=r'upcycle\.moe_layers=2: Mixtral holds a mixture of experts in every block'):
        hf_upcycle_jobs(src, open_source(src), opts)
