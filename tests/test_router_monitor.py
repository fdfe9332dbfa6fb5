"""The `upcycle_router_monitor` callback: router health through Composer's loggers, under foundry's train()."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import logged, run_train, tiny_recipe
from foundry_upcycle.loggers import read_jsonl
from foundry_upcycle.router_stats import expert_spread, routing_metrics, routing_sums
from foundry_upcycle.upcycle import expert_copies


def test_routing_metrics_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.5, 0.0]])  # T=4, E=3
    m = routing_metrics(routing_sums(logits[:2], 1) + routing_sums(logits[2:], 1), top_k=1)  # two microbatches
    p = logits.softmax(-1)
    assert torch.allclose(m['load'], torch.tensor([0.5, 0.25, 0.25]))  # argmax: 0, 1, 2, 0
    assert math.isclose(m['entropy'].item(), (-(p * p.log()).sum(-1)).mean().item(), rel_tol=1e-6)
    # megablocks: E / (T*K) * sum_e tokens_e * mean_t p_e
    want = 3 / 4 * (2 * p[:, 0].mean() + p[:, 1].mean() + p[:, 2].mean())
    assert math.isclose(m['lbl'].item(), want.item(), rel_tol=1e-6)
    uniform = routing_metrics(routing_sums(torch.zeros(6, 3), 1), 1)  # ties: topk picks one; p uniform
    assert math.isclose(uniform['lbl'].item(), 1.0, rel_tol=1e-6)
    assert math.isclose(uniform['entropy'].item(), math.log(3), rel_tol=1e-6)


def test_expert_spread_is_zero_for_copies_and_scale_free():
    g = torch.Generator().manual_seed(0)
    dense = {'w1': torch.randn(6, 4, generator=g), 'v1': torch.randn(6, 4, generator=g),
             'w2': torch.randn(6, 4, generator=g)}
    copies = {k: expert_copies(v, 4) for k, v in dense.items()}  # [4*6, 4]
    assert expert_spread(copies, 4) == 0.0
    moved = {k: v.clone() for k, v in copies.items()}
    moved['w1'][:6] += 1.0  # expert 0's w1 moves by a matrix of ones
    ones = torch.ones(6, 4)
    mean = {k: v.clone() for k, v in dense.items()}
    mean['w1'] = mean['w1'] + ones / 4
    mean_norm = math.sqrt(sum(v.square().sum().item() for v in mean.values()))
    d0 = (ones * 3 / 4).norm().item()  # expert 0 to the mean
    d_other = (ones / 4).norm().item()
    want = (d0 + 3 * d_other) / 4 / mean_norm
    assert math.isclose(expert_spread(moved, 4), want, rel_tol=1e-5)
    assert math.isclose(expert_spread({k: 3 * v for k, v in moved.items()}, 4), want, rel_tol=1e-5)


def test_monitor_logs_every_interval_and_at_the_end(corpus, dense_checkpoint, tmp_path):
    cfg = tiny_recipe('tiny/upcycle.yaml', corpus, tmp_path / 'run', dense_checkpoint=str(dense_checkpoint),
                      max_duration='4ba', eval_interval='4ba', save_interval='4ba')
    cfg['callbacks'] = {**(cfg.get('callbacks') or {}), 'upcycle_router_monitor': {'interval': 2}}
    cfg['loggers']['jsonl'] = {'path': str(tmp_path / 'metrics.jsonl')}
    trainer = run_train(cfg)
    trainer.close()
    metrics = read_jsonl(tmp_path / 'metrics.jsonl')
    n_layers, experts = cfg['model']['n_layers'], cfg['upcycle']['num_experts']
    assert [b for b, _ in metrics['router/lbl']] == [0, 2, 3]  # batches 0, 2, 4, ... and the last one (3)
    model_lbl = dict(metrics['loss/train/lbl'])
    for step, lbl in metrics['router/lbl']:
        layer_lbls = []
        for i in range(n_layers):
            at = lambda key: dict(metrics[f'router/layer{i}/{key}'])[step]  # noqa: E731
            loads = [at(f'load/expert{e}') for e in range(experts)]
            assert math.isclose(sum(loads), 1.0, rel_tol=1e-6) and min(loads) >= 0
            assert 0 < at('entropy') <= math.log(experts) + 1e-6
            # batch 0 sees the fresh copies; Composer runs batches 0 and 1 at lr 0 here (1-batch warm-up)
            assert at('expert_spread') == 0.0 if step == 0 else step < 3 or at('expert_spread') > 0
            layer_lbls.append(at('lbl'))
        assert math.isclose(lbl, sum(layer_lbls) / n_layers, rel_tol=1e-6)
        # the model's own LBL (losses.py, an independent implementation) times its weight, same batch
        assert math.isclose(model_lbl[step], cfg['upcycle']['load_balancing_loss_weight'] * lbl, rel_tol=1e-4)


def test_monitor_refuses_a_dense_model(corpus, tmp_path):
    cfg = tiny_recipe('tiny/pretrain.yaml', corpus, tmp_path / 'run', max_duration='1ba')
    cfg['callbacks'] = {**(cfg.get('callbacks') or {}), 'upcycle_router_monitor': {}}
    with pytest.raises(ValueError, match='upcycle_router_monitor: the model has no MoE layers'):
        run_train(cfg)


@pytest.mark.parametrize('interval', [0, 1.5, True])
def test_monitor_interval_is_validated(interval):
    from foundry_upcycle.router_monitor import RouterMonitor
    with pytest.raises(ValueError, match='upcycle_router_monitor.interval'):
        RouterMonitor(interval=interval)


def test_monitor_reads_a_transformers_mixtral():
    """hf_upcycle_causal_lm's model: each layer's block_sparse_moe is found, its `gate` gives the router logits, and
    the expert spread of copied experts is 0 until one expert moves (the same number as the MPT layout gives)."""
    from transformers import MixtralConfig, MixtralForCausalLM
    from foundry_upcycle import router_monitor as rm
    from foundry_upcycle.router_stats import expert_spread
    cfg = MixtralConfig(vocab_size=32, hidden_size=8, intermediate_size=12, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2)
    model = MixtralForCausalLM(cfg)
    wrapper = torch.nn.Module()
    wrapper.model, wrapper.expert_layout = model, (1, 1)
    layers = rm.moe_layers(wrapper)
    assert sorted(layers) == [0, 1] and all(rm._router_linear(m) is m.gate for m in layers.values())
    assert rm._routing_shape(wrapper) == (2, 4) and rm._shard_layout(wrapper) == (1, 1)
    experts = layers[1].experts
    with torch.no_grad():
        for e in experts[1:]:
            for name in ('w1', 'w2', 'w3'):
                getattr(e, name).weight.copy_(getattr(experts[0], name).weight)
        assert rm._mixtral_spread(experts) == 0.0
        experts[2].w3.weight.add_(0.5)
    mpt_layout = {'w1': torch.cat([e.w1.weight for e in experts]), 'v1': torch.cat([e.w3.weight for e in experts]),
                  'w2': torch.cat([e.w2.weight.t() for e in experts])}       # [E*F, D] each, as MPT holds them
    assert math.isclose(rm._mixtral_spread(experts).item(), expert_spread(mpt_layout, 4), rel_tol=1e-5)
