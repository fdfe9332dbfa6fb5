"""Inference benchmark (tiny synthetic models, CPU; vLLM through a recording stub) and the cost report."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import re
from pathlib import Path

import pytest

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')

torch = pytest.importorskip('torch')

from foundry_upcycle.atomic import atomic_write_files  # noqa: E402
from foundry_upcycle.bench import cli as bench_cli  # noqa: E402
from foundry_upcycle.bench import cost as C  # noqa: E402
from foundry_upcycle.bench import engines as EN  # noqa: E402
from foundry_upcycle.bench import inference as I  # noqa: E402
from foundry_upcycle.bench import models as MD  # noqa: E402
from foundry_upcycle.bench import modes as MO  # noqa: E402
from foundry_upcycle.bench.outputs import PAPER_MAX_THROUGHPUT  # noqa: E402
from foundry_upcycle.shapes import SHAPES, ModelShape, hf_param_count  # noqa: E402

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
STUBS = Path(__file__).parent / 'stubs'


# ------------------------------------------------------------------------------------ synthetic models

@pytest.fixture(scope='module')
def synthetic(tmp_path_factory):
    work = tmp_path_factory.mktemp('synthetic')
    return MD.synthetic_dirs(SHAPES['tiny'], 32, 0, 0.02, 'float32', work), work


def test_synthetic_moe_is_the_upcycled_dense_model(synthetic):
    (dense_dir, moe_dir), work = synthetic
    shape = SHAPES['tiny']
    dense = MD.load_hf(dense_dir, torch.float32, torch.device('cpu'))
    assert sum(p.numel() for p in dense.parameters()) == shape.params()
    x = torch.randint(3, shape.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = dense(x).logits
    for k in (1, 2):
        path = MD.with_top_k(moe_dir, k, work)
        moe = MD.load_hf(path, torch.float32, torch.device('cpu'))
        assert moe.config.num_experts_per_tok == k and moe.model.layers[0].block_sparse_moe.top_k == k
        assert sum(p.numel() for p in moe.parameters()) == shape.params(moe=True)
        with torch.no_grad():
            assert (moe(x).logits - ref).abs().max().item() < 1e-4
        count = hf_param_count(MD.read_config(path))
        expert = 3 * shape.d_model * shape.ffn_hidden  # one expert, one layer
        assert count.total - count.active == shape.n_layers * (shape.num_experts - k) * expert


def test_paper_shapes_have_the_paper_sizes():
    assert round(SHAPES['436m'].params() / 1e6) == 436
    assert round(SHAPES['436m'].params(moe=True) / 1e8) == 16
    assert round(SHAPES['1.4b'].params() / 1e8) == 14
    assert round(SHAPES['1.4b'].params(moe=True) / 1e8) == 67


def test_vllm_request_falls_back_with_a_warning(caplog, monkeypatch):
    monkeypatch.setattr(EN, 'vllm_available', lambda: False)
    with caplog.at_level(logging.WARNING, logger=EN.__name__):
        assert EN.resolve_engine('vllm', torch.device('cpu')) == 'hf'
    assert any('vllm' in r.message.lower() and 'falling back' in r.message for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=EN.__name__):
        assert EN.resolve_engine('auto', torch.device('cpu')) == 'hf'
    assert not caplog.records  # auto chose; nothing the user asked for was refused


def test_config_errors_name_the_bad_key(tmp_path):
    with pytest.raises(ValueError, match='workload.output_tokens'):
        I.Workload(output_tokens=0)
    with pytest.raises(ValueError, match='rates'):
        I.Workload(rates=(1.0, -2.0))
    with pytest.raises(ValueError, match='engine'):
        I.BenchConfig(engine='tgi')
    with pytest.raises(ValueError, match='dense_path'):
        I.BenchConfig(dense_path=str(tmp_path))  # no config.json
    with pytest.raises(ValueError, match='n_kv_heads'):
        ModelShape(64, 2, 128, 4, 3, 100)


# ------------------------------------------------------------------------------------- the benchmark (HF)

@pytest.fixture(scope='module')
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp('bench')
    wl = I.Workload(input_tokens=16, output_tokens=4, num_requests=4, batch_sizes=(1, 2), rates=(200.0,),
                    online_max_seconds=10.0, repeats=2)
    result = I.benchmark(I.BenchConfig(workload=wl, threads=1, progress=False, device='cpu'), str(out))
    return out, result


def test_benchmark_writes_json_plot_and_table(bench):
    out, result = bench
    assert sorted(p.name for p in out.iterdir()) == ['inference.json', 'latency_vs_throughput.png',
                                                     'max_throughput.md']
    data = json.loads((out / 'inference.json').read_text())
    assert data['environment']['engine'] == 'hf' and data['environment']['threads'] == 1
    by_name = {m['name']: m for m in data['models']}
    assert set(by_name) == {'dense', 'moe-top1', 'moe-top2'}
    assert (by_name['moe-top1']['top_k'], by_name['moe-top2']['top_k']) == (1, 2)
    assert by_name['dense']['active_params'] < by_name['moe-top1']['active_params'] \
        < by_name['moe-top2']['active_params'] < by_name['moe-top2']['total_params']
    for m in data['models']:
        assert 'static batching' in m['online_mode'] and 'HF' in m['online_mode']  # labelled as the fallback
        assert [r['batch_size'] for r in m['offline']] == [1, 2]
        # warm-up (1) + 2 repeats x (4 + 2 x 2 offline) + 2 repeats x 4 online requests, each prompt fresh
        assert m['prompts_sent'] == 1 + 2 * (4 + 4) + 2 * 4
        for run in m['offline'] + m['online']:
            assert len(run['repeats']) == 2
            assert run['total_tokens_per_s'] == pytest.approx(sum(r['total_tokens_per_s'] for r in run['repeats']) / 2)
            for rep in run['repeats']:  # processed tokens: prompt + generated, over the run's wall time
                assert rep['total_tokens_per_s'] * rep['wall_s'] == pytest.approx(rep['num_served'] * (16 + 4))
                assert rep['output_tokens_per_s'] * rep['wall_s'] == pytest.approx(rep['num_served'] * 4)
            for req in run['requests']:
                assert 0 < req['ttft_s'] <= req['latency_s'] and req['output_tokens'] == 4
    png = (out / 'latency_vs_throughput.png').read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000


def test_table_matches_the_measurements(bench):
    out, result = bench
    table = (out / 'max_throughput.md').read_text()
    measured, paper = table.split('## Paper reference')
    dense = next(m for m in result['models'] if m['name'] == 'dense')
    for m in result['models']:
        row = next(line for line in measured.splitlines() if line.startswith(f"| {m['name']} |")).split('|')
        assert float(row[3].split('±')[0].replace(',', '')) == pytest.approx(m['max_total_tokens_per_s'], abs=0.06)
        change = 100 * (m['max_total_tokens_per_s'] / dense['max_total_tokens_per_s'] - 1)
        assert row[4].strip() == f'{change:+.1f}%'
    paper_rows = [line for line in paper.splitlines() if line.startswith('| 436M')]
    assert paper_rows == ['| 436M | 58,140 | 1.6B | 33,820 (-42%) | 31,920 (-45%) |']


def test_max_throughput_picks_the_most_processed_tokens():
    model = {'offline': [{'batch_size': 1, 'total_tokens_per_s': 50.0, 'output_tokens_per_s': 9.0},
                         {'batch_size': 4, 'total_tokens_per_s': 80.0, 'output_tokens_per_s': 5.0}],
             'online': [{'rate': 2.0, 'total_tokens_per_s': 70.0, 'output_tokens_per_s': 8.0,
                         'total_tokens_per_s_std': 1.0}]}
    best = MO.max_throughput(model)
    assert (best['max_total_tokens_per_s'], best['output_tokens_per_s_at_max'], best['max_at']) == (80.0, 5.0,
                                                                                                     'batch 4')
    assert best['max_output_tokens_per_s'] == 9.0


def test_benchmark_of_hf_directories(synthetic):
    (dense_dir, moe_dir), _ = synthetic
    wl = I.Workload(input_tokens=8, output_tokens=2, num_requests=2, batch_sizes=(2,))
    cfg = I.BenchConfig(workload=wl, dense_path=dense_dir, moe_path=moe_dir, top_ks=(1,), engine='hf', device='cpu',
                        threads=1, progress=False)
    result = I.run_benchmark(cfg)
    assert [(m['name'], m['architecture'], m['source']) for m in result['models']] == [
        ('dense', 'LlamaForCausalLM', dense_dir), ('moe-top1', 'MixtralForCausalLM', moe_dir)]
    assert result['models'][1]['total_params'] == SHAPES['tiny'].params(moe=True)
    with pytest.raises(ValueError, match='not a mixture of experts'):
        I.run_benchmark(I.BenchConfig(workload=wl, moe_path=dense_dir, device='cpu', progress=False))


def test_memory_check_refuses_what_cannot_fit():
    huge = ModelShape(d_model=8192, n_layers=2, ffn_hidden=8192, n_heads=64, n_kv_heads=8, vocab_size=10_000_000)
    with pytest.raises(ValueError, match='GiB.*--dtype bfloat16'):
        I.check_memory(I.BenchConfig(shape=huge), 'float32', torch.device('cpu'))


def test_prompts_are_never_repeated():
    stream = MO.PromptStream(vocab_size=256, input_tokens=32, seed=0)
    prompts = torch.cat([stream.take(50), stream.take(50)])
    assert len({tuple(p.tolist()) for p in prompts}) == 100
    assert len({tuple(p[:16].tolist()) for p in prompts}) == 100  # not even a shared first cache block
    assert stream.sent == 100


def test_static_online_mode_counts_unsent_requests():
    class SleepyEngine:  # 50 ms per batch, whatever its size
        def __init__(self):
            self.batches = []

        def run_batch(self, prompts, output_tokens):
            import time
            self.batches.append(len(prompts))
            start = time.perf_counter()
            time.sleep(0.05)
            return [EN.Timing(start, start + 0.01, time.perf_counter())] * len(prompts)

    wl = I.Workload(input_tokens=4, output_tokens=2, num_requests=1000, batch_sizes=(1,), max_batch_size=4,
                    online_max_seconds=0.5)
    engine = SleepyEngine()
    run = MO.run_online_static(engine, MO.PromptStream(100, 4, 0), rate=200.0, wl=wl)
    assert 0 < run['num_served'] < 1000 and run['num_not_sent'] == 1000 - run['num_served']
    assert max(engine.batches) == 4  # the scheduler batches waiting requests, up to its limit
    assert all(r['latency_s'] >= 0.05 for r in run['requests'])  # queueing counted from arrival


def test_poisson_arrivals_are_seeded():
    a = MO.poisson_arrivals(4000, 20.0, seed=3)
    assert a[0] == 0 and (a == MO.poisson_arrivals(4000, 20.0, seed=3)).all()
    assert abs(a[-1] / 3999 - 1 / 20) < 0.005


def test_failed_writer_leaves_nothing(tmp_path):
    (tmp_path / 'a.md').write_text('old')

    def boom(path):
        raise RuntimeError('plot failed')
    with pytest.raises(RuntimeError):
        atomic_write_files(str(tmp_path), {'a.md': lambda p: open(p, 'w').write('new'), 'b.png': boom})
    assert [p.name for p in tmp_path.iterdir()] == ['a.md'] and (tmp_path / 'a.md').read_text() == 'old'


# ------------------------------------------------------------------------------- continuous batching, vLLM

class FakeAsyncEngine:
    """Continuous batching in miniature: up to `slots` requests at once, `step` seconds per token."""

    def __init__(self, slots=4, step=0.01):
        self.slots, self.step, self.running, self.aborted = slots, step, 0, []

    async def stream(self, prompt, output_tokens, request_id):
        while self.running >= self.slots:
            await asyncio.sleep(self.step)
        self.running += 1
        try:
            for n in range(1, output_tokens + 1):
                await asyncio.sleep(self.step)
                yield n
        finally:
            self.running -= 1

    async def abort(self, request_id):
        self.aborted.append(request_id)


def test_continuous_mode_is_bounded_and_counts_what_is_still_queued():
    wl = I.Workload(input_tokens=4, output_tokens=5, num_requests=400, batch_sizes=(), rates=(300.0,),
                    online_max_seconds=0.5, drain_seconds=0.2)
    # serves at most ~80 requests/s: 300/s leaves a backlog of ~100 that the 0.2 s drain cannot clear (at 100/s the
    # backlog was small enough to drain on an idle machine, so the test was flaky)
    engine = FakeAsyncEngine(slots=4, step=0.01)
    run = asyncio.run(MO.run_continuous(engine, MO.PromptStream(100, 4, 0), 300.0, wl, seed=0))
    sent = 400 - run['num_not_sent']
    assert 0 < sent < 400 and run['num_served'] + run['num_unfinished'] == sent == len(run['requests'])
    assert run['num_unfinished'] > 0 and len(engine.aborted) == run['num_unfinished']
    partial = [r for r in run['requests'] if not r['finished']]
    assert any(0 < r['output_tokens'] < 5 for r in partial)  # cut mid-generation: its tokens still count
    out_tokens = sum(r['output_tokens'] for r in run['requests'])
    assert run['output_tokens_per_s'] * run['wall_s'] == pytest.approx(out_tokens)
    done = [r for r in run['requests'] if r['finished']]
    assert all(len(r['itl_s']) == 4 and r['tpot_s'] > 0 and r['ttft_s'] > 0 for r in done)
    assert run['ttft_p99_s'] >= run['ttft_p50_s'] and run['itl_p50_s'] > 0


def test_rate_sweep_stops_at_saturation():
    seen = []

    def measure(rate):
        seen.append(rate)
        return {'rate': rate, 'total_tokens_per_s': min(rate, 8.0) * 100, 'num_unfinished': 0}
    results = MO.rate_sweep(measure, I.Workload(rates='auto', start_rate=1.0), None)
    assert seen == [1.0, 2.0, 4.0, 8.0, 16.0]  # 16 gives no more than 8: saturated
    assert [r['rate'] for r in results] == seen


@pytest.fixture
def vllm_stub(monkeypatch, tmp_path):
    log = tmp_path / 'vllm.jsonl'
    monkeypatch.syspath_prepend(str(STUBS))
    monkeypatch.setenv('PYTHONPATH', os.pathsep.join([str(STUBS), os.environ.get('PYTHONPATH', '')]))
    monkeypatch.setenv('VLLM_STUB_LOG', str(log))
    monkeypatch.setattr(EN, 'VLLMEngine', EN.VLLMEngine)
    monkeypatch.setattr(EN.VLLMEngine, '_created', False)
    return log


def _events(log):
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_vllm_engines_one_per_process_prefix_caching_off_top_k_fresh_prompts(vllm_stub, monkeypatch, tmp_path):
    monkeypatch.setattr(I, 'resolve_engine', lambda requested, device: 'vllm')
    wl = I.Workload(input_tokens=24, output_tokens=3, num_requests=6, batch_sizes=(2,), rates=(40.0,), repeats=3,
                    online_max_seconds=2.0)
    result = I.benchmark(I.BenchConfig(workload=wl, engine='vllm', device='cpu', progress=False), str(tmp_path / 'o'))
    events = _events(vllm_stub)
    engines = [e for e in events if e['event'] == 'engine']
    assert [e['top_k'] for e in engines] == [None, 1, 2]  # dense, then the MoE at each top-k
    assert len({e['pid'] for e in engines}) == 3 and os.getpid() not in {e['pid'] for e in engines}
    assert all(e['kwargs']['enable_prefix_caching'] is False for e in engines)
    assert all(e['kwargs']['max_model_len'] == 27 and e['kwargs']['skip_tokenizer_init'] for e in engines)
    for pid in {e['pid'] for e in engines}:
        requests = [e for e in events if e['event'] == 'request' and e['pid'] == pid]
        assert len({r['prompt'] for r in requests}) == len(requests)  # no prompt twice, warm-up included
        assert len({tuple(r['head']) for r in requests}) == len(requests)
        assert all(r['len'] == 24 and r['max_tokens'] == 3 and r['ignore_eos'] for r in requests)
    assert sum(e['event'] == 'shutdown' for e in events) == 3
    assert result['environment']['engine'] == 'vllm' and result['environment']['vllm'] == '0.11.0'
    for m in result['models']:
        assert m['online_mode'].startswith('continuous') and len(m['online'][0]['repeats']) == 3
        assert m['online'][0]['total_tokens_per_s_std'] is not None and m['online'][0]['tpot_p50_s'] > 0
        assert m['max_total_tokens_per_s'] > 0


def test_vllm_version_guard_and_one_engine_per_process(vllm_stub, monkeypatch, synthetic):
    (dense_dir, _), _ = synthetic
    import vllm
    args = EN.vllm_engine_args(dense_dir, 'float32', 4, 32, 0)
    monkeypatch.setattr(vllm, '__version__', '0.6.2')
    with pytest.raises(ValueError, match=r'vLLM 0\.6\.2 is not supported.*>= 0\.10\.0'):
        EN.VLLMEngine(args)
    monkeypatch.setattr(vllm, '__version__', '0.11.0')
    engine = EN.VLLMEngine(args)
    with pytest.raises(RuntimeError, match='one vLLM engine per process'):
        EN.VLLMEngine(args)
    engine.close()


# ---------------------------------------------------------------------------------------- cost report

FPT_DENSE, FPT_MOE = 6e6, 9e6  # training FLOPs per token; inference = / 3


def make_results(cpt_ce, up_ce, budgets=(0.25, 0.5, 1.0), flops=(1e12, 2e12, 4e12), cpt_core=None, up_core=None):
    arms = []
    for i, b in enumerate(budgets):
        for kind, ce, core, fpt in (('cpt', cpt_ce, cpt_core, FPT_DENSE), ('upcycle', up_ce, up_core, FPT_MOE)):
            arms.append({
                'arm': kind, 'budget': b, 'tokens': flops[i] / fpt, 'steps': 10, 'train_flops': flops[i],
                'flops_per_token': fpt, 'total_params': 100, 'active_params': 80, 'train_ce_last50': 3.0,
                'tokens_per_s': 1.0, 'step_time_s': 1.0, 'loss_curve': [[1, 3.0]],
                'eval': {'ce_generic': 3.0, 'ce_domain': ce[i], 'core_average': None if core is None else core[i],
                         'tasks': {}},
            })
    return {'schema': 1, 'config': {'upcycle': {'top_k': 2}}, 'budgets': list(budgets), 'token_ratio': 0.67,
            'missing_eval_tasks': [],
            'dense': {'params': 1000, 'flops_per_token': FPT_DENSE, 'pretrain_tokens': 1e6, 'pretrain_flops': 4e12,
                      'eval': {'ce_generic': 3.1, 'ce_domain': 3.2, 'core_average': 0.0, 'tasks': {}}},
            'arms': arms}


def make_inference(dense_tps=100.0, top1_tps=90.0, top2_tps=80.0):
    def model(name, kind, k, tps):
        return {'name': name, 'kind': kind, 'top_k': k, 'total_params': 1000, 'active_params': 1000,
                'max_output_tokens_per_s': tps, 'max_total_tokens_per_s': 5 * tps, 'offline': [], 'online': []}
    return {'schema': 1, 'environment': {'engine': 'hf', 'device': 'cpu', 'device_name': 'test'},
            'workload': {'input_tokens': 64, 'output_tokens': 16},
            'models': [model('dense', 'dense', None, dense_tps), model('moe-top1', 'moe', 1, top1_tps),
                       model('moe-top2', 'moe', 2, top2_tps)]}


def test_break_even_interpolated_and_extrapolated_by_hand():
    # CPT CE falls 0.1 per doubling of compute: 3.0, 2.9, 2.8 at 1, 2, 4 (x1e12) FLOPs.
    cost = C.build_cost(make_results([3.0, 2.9, 2.8], [2.85, 2.85, 2.6],
                                     cpt_core=[0.1, 0.2, 0.3], up_core=[0.25, 0.2, 0.5]), make_inference())
    assert cost['top_k'] == 2
    assert cost['inference']['throughput_ratio'] == pytest.approx(1.25)
    low, mid, high = cost['budgets']
    # 0.25x: the upcycled 2.85 sits half way (in log compute) between 2e12 and 4e12 -> CPT needs 2**1.5 e12.
    be = low['break_even']['ce_domain']
    assert be['status'] == 'interpolated'
    assert be['cpt_train_flops_needed'] == pytest.approx(2 ** 1.5 * 1e12)
    extra = (2 ** 1.5 - 1) * 1e12
    assert be['extra_train_flops'] == pytest.approx(extra)
    assert be['tokens_flops'] == pytest.approx(extra / ((FPT_MOE - FPT_DENSE) / 3))  # 1e6 extra FLOPs/token
    assert be['tokens_throughput'] == pytest.approx(extra / (FPT_DENSE / 3 * 0.25))  # MoE 25% slower
    assert low['ce_domain_gain'] == pytest.approx(0.15)
    assert low['extra_cost_per_token'] == {'seconds': pytest.approx(0.25), 'throughput': pytest.approx(0.25),
                                           'flops': pytest.approx(0.5)}
    assert low['quality_per_extra_cost']['seconds']['ce_domain'] == pytest.approx(0.15 / 0.25)
    # Core average (higher is better) crosses at the same place: 0.25 between 0.2 and 0.3.
    assert low['break_even']['core_average']['cpt_train_flops_needed'] == pytest.approx(2 ** 1.5 * 1e12)
    # 0.5x: upcycled 2.85 vs CPT 2.9 at 2e12 -> same crossing, less extra compute.
    assert mid['break_even']['ce_domain']['extra_train_flops'] == pytest.approx((2 ** 1.5 - 2) * 1e12)
    # 1.0x: upcycled 2.6 is 0.2 below CPT's last point -> two more doublings: 16e12.
    be = high['break_even']['ce_domain']
    assert be['status'] == 'extrapolated' and be['extrapolation_factor'] == pytest.approx(4.0)
    assert be['tokens_flops'] == pytest.approx(12e12 / 1e6)
    assert high['break_even']['core_average']['status'] == 'extrapolated'


def test_break_even_never_when_cpt_saturates():
    flat = make_results([3.0, 2.9, 2.9, 2.9], [2.95, 2.85, 2.8, 2.8], budgets=(0.1, 0.2, 0.4, 0.8),
                        flops=(1e12, 2e12, 4e12, 8e12))
    cost = C.build_cost(flat, make_inference())
    be = cost['budgets'][-1]['break_even']['ce_domain']
    assert be['status'] == 'never' and be['tokens_flops'] is None and be['tokens_throughput'] is None
    assert be['verdict_flops'].startswith('never')
    assert cost['budgets'][0]['break_even']['ce_domain']['status'] == 'interpolated'  # 2.95 reached at 1.41e12
    worse = C.build_cost(make_results([3.0, 2.9, 3.0], [2.9, 2.8, 2.7]), make_inference())  # CPT gets worse
    assert worse['budgets'][-1]['break_even']['ce_domain']['status'] == 'never'
    assert 'never' in C.render_cost_section(cost)


def test_no_gain_and_no_extra_cost():
    cost = C.build_cost(make_results([3.0, 2.9, 2.8], [3.1, 2.95, 2.8]), make_inference())
    for row in cost['budgets']:  # CPT as good or better: dense is cheaper at any demand
        assert row['break_even']['ce_domain']['status'] == 'not_needed'
        assert row['break_even']['ce_domain']['tokens_throughput'] == 0.0
    fast_moe = C.build_cost(make_results([3.0, 2.9, 2.8], [2.85, 2.85, 2.75]), make_inference(top2_tps=120.0))
    be = fast_moe['budgets'][0]['break_even']['ce_domain']
    assert be['tokens_throughput'] is None and 'no more per token' in be['verdict_throughput']
    assert be['tokens_flops'] is not None


def test_missing_field_is_named():
    results = make_results([3.0, 2.9, 2.8], [2.85, 2.85, 2.6])
    del results['arms'][3]['eval']['ce_domain']
    with pytest.raises(ValueError, match=re.escape("arms[3]: field 'eval.ce_domain' is missing")):
        C.build_cost(results, make_inference())
    results = make_results([3.0, 2.9, 2.8], [2.85, 2.85, 2.6])
    del results['dense']['flops_per_token']
    with pytest.raises(ValueError, match="'dense.flops_per_token' is missing"):
        C.build_cost(results, make_inference())
    results = make_results([3.0, 2.9, 2.8], [2.85, 2.85, 2.6])
    results['arms'] = [a for a in results['arms'] if not (a['arm'] == 'upcycle' and a['budget'] == 0.5)]
    with pytest.raises(ValueError, match="budget 0.5 has no 'upcycle' arm"):
        C.build_cost(results, make_inference())
    inference = make_inference()
    del inference['models'][0]['max_output_tokens_per_s']
    with pytest.raises(ValueError, match=r"models\[0\]: field 'max_output_tokens_per_s'"):
        C.build_cost(make_results([3.0, 2.9, 2.8], [2.85, 2.85, 2.6]), inference)
    inference = make_inference()
    inference['models'] = inference['models'][:2]  # no top-2 MoE benchmarked
    with pytest.raises(ValueError, match='top_k=2'):
        C.build_cost(make_results([3.0, 2.9, 2.8], [2.85, 2.85, 2.6]), inference)


def schema2(results, seconds=None, sem=None):
    """results.json schema 2 (the study's multi-seed format) from a schema-1 dict."""
    arms = []
    for i, a in enumerate(results['arms']):
        secs = None if seconds is None else seconds[a['arm']][i // 2]
        arms.append({'arm': a['arm'], 'budget': a['budget'], 'train_flops': a['train_flops'],
                     'train_tokens': a['tokens'], 'eval': a['eval'], 'n_seeds': 3,
                     'eval_std': {'ce_domain': 0.01}, 'eval_sem': {'ce_domain': sem} if sem else {},
                     'per_seed': [], 'train_seconds': secs})
    return {**results, 'schema': 2, 'arms': arms}


def test_seconds_basis_by_hand_and_schema_2():
    """Defect 7: training seconds per arm (results.json) and serving seconds per processed token (benchmark)."""
    base = make_results([3.0, 2.9, 2.8], [2.85, 2.85, 2.6])
    # CPT takes 100, 200, 400 s; the upcycled runs 150, 300, 600 s (slower per FLOP).
    results = schema2(base, seconds={'cpt': [100.0, 200.0, 400.0], 'upcycle': [150.0, 300.0, 600.0]})
    cost = C.build_cost(results, make_inference())  # total tokens/s: dense 500, top-2 400
    assert cost['results_schema'] == 2 and cost['inference']['metric'] == 'total_tokens_per_s'
    extra_per_token = 1 / 400 - 1 / 500
    assert cost['inference']['extra_seconds_per_token'] == pytest.approx(extra_per_token)
    low = cost['budgets'][0]['break_even']['ce_domain']
    # 2.85 is reached half way (log) between the CPT runs of 200 s and 400 s: 2**1.5 * 100 s; upcycled took 150 s.
    assert low['cpt_train_seconds_needed'] == pytest.approx(2 ** 1.5 * 100)
    assert low['extra_train_seconds'] == pytest.approx(2 ** 1.5 * 100 - 150)
    assert low['tokens_seconds'] == pytest.approx((2 ** 1.5 * 100 - 150) / extra_per_token)
    mid = cost['budgets'][1]['break_even']['ce_domain']  # upcycled took 300 s > 282.8 s CPT needs: no demand helps
    assert mid['extra_train_seconds'] == 0.0 and mid['tokens_seconds'] == 0.0
    # Same FLOP-basis answer as schema 1 (flops_per_token derived from train_flops / train_tokens).
    one = C.build_cost(base, make_inference())
    assert low['tokens_flops'] == pytest.approx(one['budgets'][0]['break_even']['ce_domain']['tokens_flops'])
    md = C.render_cost_section(cost)
    assert f"{low['tokens_seconds']:.3g}" in md and 'tokens processed' in md and 'optimistic for CPT' in md


def test_seconds_missing_is_said_not_invented_and_ties_are_called():
    results = schema2(make_results([3.0, 2.9, 2.8], [2.85, 2.89, 2.6]), seconds=None, sem=0.02)
    cost = C.build_cost(results, make_inference())
    be = cost['budgets'][0]['break_even']['ce_domain']
    assert be['tokens_seconds'] is None and be['seconds_status'] == 'missing'
    assert 'train_seconds missing' in be['verdict_seconds']
    assert any('no training seconds' in w for w in cost['warnings'])
    mid = cost['budgets'][1]
    assert mid['ce_domain_gain'] == pytest.approx(0.01) and mid['ce_domain_verdict'] == 'tie'  # 0.01 < 2 x 0.028
    assert cost['budgets'][2]['ce_domain_verdict'] == 'upcycle'
    md = C.render_cost_section(cost)
    assert 'a tie' in md and 'The seconds basis is missing:' in md and 'beyond no seconds basis' not in md
    with pytest.raises(ValueError, match="arms\\[0\\]: field 'n_seeds'"):
        bad = schema2(make_results([3.0, 2.9, 2.8], [2.85, 2.85, 2.6]))
        del bad['arms'][0]['n_seeds']
        C.build_cost(bad, make_inference())


def schema3(results, winners, seconds=None):
    """results.json schema 3: the study's paired verdicts (`comparisons`) per budget, with 95% intervals."""
    out = schema2(results, seconds=seconds)
    out['schema'] = 3
    comps = {}
    for b in out['budgets']:
        up = next(a for a in out['arms'] if a['arm'] == 'upcycle' and a['budget'] == b)['eval']['ce_domain']
        cpt = next(a for a in out['arms'] if a['arm'] == 'cpt' and a['budget'] == b)['eval']['ce_domain']
        gap = up - cpt
        comps[f'{b:g}'] = {'ce_domain': {'winner': winners[b], 'gap': gap, 'ci': [gap - 0.01, gap + 0.01],
                                         'test': 'paired t over seeds'}}
    out['comparisons'] = {'upcycle': comps}
    return out


def test_a_tie_never_reads_as_a_win():
    """Whatever the CPT curve says (interpolated, extrapolated, never), a gap the study's test calls a tie reads as
    a tie in the cost text, never as a win; a real lead says how each break-even was found."""
    # CPT saturates at 2.8: the upcycled 2.9 is interpolated, the 2.7s are never reached
    results = make_results([3.0, 2.8, 2.8, 2.8], [2.9, 2.7, 2.7, 2.79], budgets=(0.1, 0.2, 0.4, 0.8),
                           flops=(1e12, 2e12, 4e12, 8e12))
    seconds = {'cpt': [100.0, 200.0, 400.0, 800.0], 'upcycle': [120.0, 240.0, 480.0, 960.0]}
    growing = make_results([3.0, 2.9, 2.8], [2.85, 2.85, 2.6])              # the 2.6 is extrapolated
    statuses = set()
    for res, budgets in ((results, (0.1, 0.2, 0.4, 0.8)), (growing, (0.25, 0.5, 1.0))):
        secs = seconds if len(budgets) == 4 else {k: v[:3] for k, v in seconds.items()}
        ties = C.build_cost(schema3(res, {b: 'tie' for b in budgets}, secs), make_inference())
        statuses |= {row['break_even']['ce_domain']['status'] for row in ties['budgets']}
        decisions = [line for line in C.render_cost_section(ties).splitlines() if line.startswith(('- 0.', '- 1'))]
        assert len(decisions) == len(budgets)
        for line in decisions:
            assert 'a tie' in line and 'win' not in line and 'ahead' not in line, line
    assert {'interpolated', 'extrapolated', 'never'} <= statuses
    wins = C.build_cost(schema3(results, {0.1: 'upcycle', 0.2: 'upcycle', 0.4: 'upcycle', 0.8: 'tie'}, seconds),
                        make_inference())
    text = C.render_cost_section(wins)
    assert '- 0.1x: upcycling is ahead on ce_domain' in text and 'interpolated between measured CPT runs' in text
    assert 'by measured training and serving seconds' in text and 'paired t over seeds' in text
    assert '- 0.8x: a tie' in text


def test_cost_report_files_and_section(tmp_path):
    (tmp_path / 'results.json').write_text(json.dumps(make_results([3.0, 2.9, 2.8], [2.85, 2.85, 2.6],
                                                                   cpt_core=[0.1, 0.2, 0.3],
                                                                   up_core=[0.25, 0.2, 0.5])))
    (tmp_path / 'inference.json').write_text(json.dumps(make_inference()))
    out = tmp_path / 'cost'
    cost = C.cost_report(str(tmp_path / 'results.json'), str(tmp_path / 'inference.json'), str(out))
    assert sorted(p.name for p in out.iterdir()) == ['cost.json', 'cost.md', 'cost_breakeven.png']
    assert json.loads((out / 'cost.json').read_text())['budgets'][0]['break_even']['ce_domain']['status'] \
        == 'interpolated'
    md = (out / 'cost.md').read_text()
    assert md == C.render_cost_section(cost) and md.startswith('## Inference cost')
    assert f"{cost['budgets'][0]['break_even']['ce_domain']['tokens_flops']:.3g}" in md
    assert '### Assumptions' in md and 'measured with engine hf on cpu' in md
    assert (out / 'cost_breakeven.png').read_bytes().startswith(PNG_MAGIC)


# ------------------------------------------------------------------------------------------------ CLI

def _parser():
    parser = argparse.ArgumentParser(prog='foundry-upcycle')
    bench_cli.register(parser.add_subparsers(dest='command'))
    return parser


def test_cli_bench_config_and_errors(tmp_path):
    args = _parser().parse_args(['bench-inference', '--shape', 'tiny', '--layers', '3', '--device', 'cpu',
                                 '--batch-sizes', '1,4', '--rates', '0.5,2', '--out', str(tmp_path)])
    cfg = bench_cli.bench_config(args)
    assert cfg.shape.n_layers == 3 and cfg.shape.d_model == 64
    assert (cfg.workload.input_tokens, cfg.workload.output_tokens) == I.CPU_WORKLOAD
    assert cfg.workload.batch_sizes == (1, 4) and cfg.workload.rates == (0.5, 2.0) and cfg.top_ks == (1, 2)
    args = _parser().parse_args(['bench-inference', '--device', 'cpu', '--workload', 'paper', '--rates', '8,16',
                                 '--online-max-seconds', '6', '--out', str(tmp_path)])
    wl = bench_cli.bench_config(args).workload
    assert (wl.input_tokens, wl.output_tokens, wl.repeats, wl.rates, wl.online_max_seconds) == (3500, 300, 3,
                                                                                                (8.0, 16.0), 6.0)
    for argv, match in ((['--batch-sizes', '1,x'], '--batch-sizes'), (['--rates', '-1'], '--rates'),
                        (['--shape', 'huge'], '--shape'), (['--dense', str(tmp_path / 'nope')], '--dense')):
        args = _parser().parse_args(['bench-inference', '--device', 'cpu', '--out', str(tmp_path), *argv])
        with pytest.raises(ValueError, match=match):
            bench_cli.bench_config(args)


def test_cli_cost(tmp_path, capsys):
    (tmp_path / 'results.json').write_text(json.dumps(make_results([3.0, 2.9, 2.8], [2.85, 2.85, 2.6])))
    (tmp_path / 'inference.json').write_text(json.dumps(make_inference()))
    args = _parser().parse_args(['cost', '--results', str(tmp_path / 'missing.json'), '--inference',
                                 str(tmp_path / 'inference.json'), '--out', str(tmp_path / 'o')])
    with pytest.raises(ValueError, match='--results'):
        args.func(args)
    args = _parser().parse_args(['cost', '--results', str(tmp_path / 'results.json'), '--inference',
                                 str(tmp_path / 'inference.json'), '--out', str(tmp_path / 'o'), '--top-k', '1'])
    assert args.func(args) == 0
    cost = json.loads((tmp_path / 'o' / 'cost.json').read_text())
    assert cost['top_k'] == 1 and cost['inference']['throughput_ratio'] == pytest.approx(100 / 90)
    assert math.isclose(cost['budgets'][0]['extra_cost_per_token']['throughput'], 100 / 90 - 1)
    assert any('top-1' in w and 'trained with top-2' in w for w in cost['warnings'])
    assert 'cost.md' in capsys.readouterr().out
