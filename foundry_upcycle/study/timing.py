"""Step-time ratio of the two arms, measured so that it means something: both models step on the same synthetic
batch shape, interleaved (CPT, upcycled, CPT, ...) after a warm-up, in one process with the same thread count;
the ratio is the median step of one over the median step of the other. The machine's load average is recorded
before and after. A measurement is flagged as loaded when, with one torch thread, this process got less than
`MIN_CPU_SHARE` of the wall time on a core while it stepped (other work took its core); with more threads, when the
1-minute load average showed more runnable work than cores. The load average lags by about a minute, so right after
the study's own training runs it still reads high although nothing else runs: the CPU share is the direct test.

Steps are forward + backward + AdamW on random token ids (weights at their initialisation: step time does not
depend on the values, except through routing balance, which a fresh router keeps near uniform)."""
from __future__ import annotations

import os
import statistics
import time
from typing import Any, Callable, Mapping

WARMUP_STEPS = 3
ROUNDS = 6
STEPS_PER_ROUND = 2
MIN_CPU_SHARE = 0.85


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def is_loaded(load_before: list[float] | None, load_after: list[float] | None, cpus: int, threads: int,
              cpu_share: float | None = None) -> bool:
    """One thread: it got less than MIN_CPU_SHARE of the wall time on a core. Otherwise: more runnable work than
    cores beside our own threads (1-minute load average) before or after."""
    if threads == 1 and cpu_share is not None:
        return cpu_share < MIN_CPU_SHARE
    worst = max((l[0] for l in (load_before, load_after) if l), default=0.0)
    return worst - threads > 0.5 * cpus or worst > cpus + 0.5


def _build(model_cfg: Mapping[str, Any], tokenizer):
    import copy
    from llmfoundry.utils.builders import build_composer_model
    cfg = copy.deepcopy(dict(model_cfg))
    name = cfg.pop('name')
    cfg['init_device'] = 'cpu'
    return build_composer_model(name=name, cfg=cfg, tokenizer=tokenizer)


def _step_fn(model, batch_size: int, seq_len: int, vocab: int, seed: int):
    import torch
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
    batch = {'input_ids': ids, 'attention_mask': torch.ones_like(ids), 'labels': ids.clone()}
    # one tensor at a time, as Composer's DecoupledAdamW steps (foreach would hold extra copies of every parameter:
    # a real base's MoE beside its dense model ran out of 24 GB with it)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    model.train()

    def step() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        out = model(batch)
        loss = model.loss(out, batch)
        loss = loss['total'] if isinstance(loss, dict) else loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, time.process_time() - c0
    return step


def measure_step_times(models: Mapping[str, Mapping[str, Any]], tokenizer_dir: str, batch_size: int, seq_len: int,
                       threads: int | None = None, warmup: int = WARMUP_STEPS, rounds: int = ROUNDS,
                       steps_per_round: int = STEPS_PER_ROUND) -> dict[str, Any]:
    """{'step_time_s': {arm: median}, 'ratio': upcycle / cpt, 'steps': {arm: [...]}, load averages, 'loaded'}.

    models: arm -> foundry model block (e.g. {'cpt': dense, 'upcycle': moe}); the ratio needs both."""
    import torch
    from llmfoundry.utils.builders import build_tokenizer
    before_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        tok = build_tokenizer(tokenizer_dir, {'model_max_length': seq_len})
        steps = {}
        for arm, cfg in models.items():
            torch.manual_seed(0)
            model = _build(cfg, tok)
            vocab = int(cfg.get('vocab_size') or model.model.config.vocab_size)   # an hf_causal_lm block has none
            steps[arm] = _step_fn(model, batch_size, seq_len, vocab, seed=0)
        load_before = load_average()
        times, cpu = interleave(steps, warmup, rounds, steps_per_round)
        load_after = load_average()
        n_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(before_threads)
    cpus = os.cpu_count() or 1
    out = summarize(times, cpu)
    return {
        **out,
        'method': f'{warmup} warm-up steps each, then {rounds} interleaved rounds of {steps_per_round} steps per arm; '
                  f'median; batch {batch_size} x {seq_len} tokens, {n_threads} torch threads',
        'load_average_before': load_before, 'load_average_after': load_after, 'cpu_count': cpus,
        'threads': n_threads, 'loaded': is_loaded(load_before, load_after, cpus, n_threads, out['cpu_share']),
    }


def interleave(steps: Mapping[str, Callable[[], tuple[float, float]]], warmup: int, rounds: int,
               steps_per_round: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Runs each arm's `warmup` steps (not recorded), then `rounds` rounds of `steps_per_round` steps per arm, the
    arms in turn (A A B B A A B B ...), so that slow drifts of the machine hit every arm alike. Each step returns
    (wall seconds, CPU seconds); returns those of the recorded steps per arm."""
    for arm in steps:
        for _ in range(warmup):
            steps[arm]()
    times: dict[str, list[float]] = {arm: [] for arm in steps}
    cpu: dict[str, list[float]] = {arm: [] for arm in steps}
    for _ in range(rounds):
        for arm in steps:
            for _ in range(steps_per_round):
                wall, c = steps[arm]()
                times[arm].append(wall)
                cpu[arm].append(c)
    return times, cpu


def summarize(times: Mapping[str, list[float]], cpu: Mapping[str, list[float]]) -> dict[str, Any]:
    """Median step per arm, the upcycled / CPT ratio of the medians (and every other arm's against CPT), the raw
    steps, and this process's share of a core while stepping."""
    medians = {arm: statistics.median(t) for arm, t in times.items()}
    return {
        'step_time_s': medians,
        'ratio': medians['upcycle'] / medians['cpt'] if {'cpt', 'upcycle'} <= set(medians) else None,
        'ratios': {arm: m / medians['cpt'] for arm, m in medians.items() if arm != 'cpt' and 'cpt' in medians},
        'steps_s': {arm: [round(x, 5) for x in t] for arm, t in times.items()},
        # CPU time of this process per step: with 1 thread, close to an idle machine's wall time even under load
        'cpu_step_time_s': {arm: statistics.median(t) for arm, t in cpu.items()},
        'cpu_share': round(sum(sum(c) for c in cpu.values()) / max(1e-9, sum(sum(t) for t in times.values())), 3),
    }
