"""How requests reach an engine, and what is measured.

- offline: static batches of each batch size, back to back; latency counts from each batch's submission.
- continuous (the paper's Figures 2/3; needs an engine with continuous batching, i.e. vLLM): Poisson arrivals
  at each request rate, every request submitted the moment it arrives; TTFT, TPOT, inter-token latency and
  end-to-end latency percentiles. Bounded: nothing is submitted after `online_max_seconds`, and requests still
  unfinished `drain_seconds` later are cancelled and counted (`num_unfinished`, their tokens so far included),
  never dropped. `rates: auto` doubles the rate from `start_rate` until throughput stops growing (saturation).
- static online (the HF `generate` fallback, labelled so): Poisson arrivals, but the idle engine takes up to
  `max_batch_size` waiting requests as one blocking batch; arrivals wait. Not continuous batching.
Every request gets its own fresh prompt (`PromptStream`): no prompt is sent twice in a process, so no prefix
cache can skip prefill. Headline: max throughput in input + output tokens/s, as the paper reports it.
"""
from __future__ import annotations

import asyncio
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np

PAPER_WORKLOAD = (3500, 300)  # input, output tokens (paper, vLLM on H100)
CPU_WORKLOAD = (64, 16)
SATURATION_GAIN = 0.05  # auto rates stop when throughput grows by less than this from one doubling to the next
MAX_AUTO_RATES = 10


def _positive_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


@dataclass(frozen=True)
class Workload:
    input_tokens: int = CPU_WORKLOAD[0]
    output_tokens: int = CPU_WORKLOAD[1]
    num_requests: int = 16          # per setting (batch size, rate) and repeat
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    rates: Union[tuple[float, ...], str] = ()  # requests/s, or 'auto' (a doubling sweep to saturation)
    start_rate: float = 1.0         # first rate of the 'auto' sweep
    max_batch_size: Optional[int] = None  # engine concurrency limit (vLLM max_num_seqs; HF static batches)
    online_max_seconds: float = 30.0
    drain_seconds: Optional[float] = None  # after the submission bound; default online_max_seconds
    repeats: int = 1
    seed: int = 0

    def __post_init__(self):
        for key in ('input_tokens', 'output_tokens', 'num_requests', 'repeats'):
            if not _positive_int(getattr(self, key)):
                raise ValueError(f'workload.{key} must be a positive integer, got {getattr(self, key)!r}')
        if not all(_positive_int(b) for b in self.batch_sizes):
            raise ValueError(f'workload.batch_sizes must be positive integers, got {self.batch_sizes!r}')
        if self.rates != 'auto':
            if isinstance(self.rates, str) or not all(isinstance(r, (int, float)) and r > 0 for r in self.rates):
                raise ValueError(f"workload.rates must be positive numbers or 'auto', got {self.rates!r}")
        if not self.batch_sizes and not self.rates:
            raise ValueError('workload: give batch_sizes (offline mode), rates (online mode) or both')
        if self.max_batch_size is not None and not _positive_int(self.max_batch_size):
            raise ValueError(f'workload.max_batch_size must be a positive integer, got {self.max_batch_size!r}')
        for key in ('online_max_seconds', 'start_rate'):
            if not getattr(self, key) > 0:
                raise ValueError(f'workload.{key} must be > 0, got {getattr(self, key)!r}')
        if self.drain_seconds is not None and not self.drain_seconds >= 0:
            raise ValueError(f'workload.drain_seconds must be >= 0, got {self.drain_seconds!r}')

    @property
    def scheduler_batch(self) -> int:
        return self.max_batch_size or max(self.batch_sizes, default=8)

    @property
    def drain(self) -> float:
        return self.online_max_seconds if self.drain_seconds is None else self.drain_seconds


def paper_workload(**over: Any) -> Workload:
    """The paper's serving workload: 3500 input / 300 output tokens, a rate sweep to saturation, 3 repeats."""
    return Workload(**{'input_tokens': PAPER_WORKLOAD[0], 'output_tokens': PAPER_WORKLOAD[1], 'num_requests': 200,
                       'batch_sizes': (), 'rates': 'auto', 'start_rate': 2.0, 'max_batch_size': 256,
                       'online_max_seconds': 20.0, 'drain_seconds': 20.0, 'repeats': 3, **over})


class PromptStream:
    """Fresh random prompts [n, L] (ids 3.. : 0-2 are pad/bos/eos); never the same prompt twice."""

    def __init__(self, vocab_size: int, input_tokens: int, seed: int):
        import torch
        self._torch = torch
        self.vocab, self.length = max(vocab_size, 4), input_tokens
        self.gen = torch.Generator().manual_seed(seed)
        self.sent = 0

    def take(self, n: int):
        self.sent += n
        return self._torch.randint(3, self.vocab, (n, self.length), generator=self.gen)


def _pct(values: Sequence[float], q: float) -> Optional[float]:
    return float(np.percentile(values, q)) if len(values) else None


def _percentiles(prefix: str, values: Sequence[float]) -> dict[str, Optional[float]]:
    return {f'{prefix}_{name}': _pct(values, q) for name, q in (('p50_s', 50), ('p90_s', 90), ('p99_s', 99))} | {
        f'{prefix}_mean_s': float(np.mean(values)) if len(values) else None}


def summarize(requests: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    """Aggregates per-request records over `wall_s` as vLLM's serving benchmark does: throughput, latency, TTFT,
    TPOT and ITL count successful (finished) requests only; what cancelled requests produced is reported apart
    (`unfinished_output_tokens`), never in a throughput."""
    done = [r for r in requests if r['finished']]
    out_tok = sum(r['output_tokens'] for r in done)
    in_tok = sum(r['input_tokens'] for r in done)
    ok = wall_s > 0 and requests
    return {
        'num_served': len(done), 'num_unfinished': len(requests) - len(done), 'wall_s': wall_s,
        'unfinished_output_tokens': sum(r['output_tokens'] for r in requests if not r['finished']),
        'output_tokens_per_s': out_tok / wall_s if ok else 0.0,
        'total_tokens_per_s': (in_tok + out_tok) / wall_s if ok else 0.0,
        'requests_per_s': len(done) / wall_s if ok else 0.0,
        **_percentiles('latency', [r['latency_s'] for r in done]),
        **_percentiles('ttft', [r['ttft_s'] for r in done if r['ttft_s'] is not None]),
        **_percentiles('tpot', [r['tpot_s'] for r in done if r.get('tpot_s') is not None]),
        **_percentiles('itl', [g for r in done for g in r.get('itl_s', ())]),
    }


def _record(arrival: float, t0: float, first: Optional[float], end: float, chunk_times: Sequence[float],
            input_tokens: int, n: int, finished: bool) -> dict[str, Any]:
    """One request: `chunk_times` are the arrival times of the engine's outputs (one may carry several tokens),
    `n` the tokens produced. ITL: one gap per received chunk after the first, as vLLM's benchmark records it
    (a chunk of k tokens is one gap, not k-1 zero gaps); TPOT: (end - first) / (n - 1)."""
    itl = [b - a for a, b in zip(chunk_times, chunk_times[1:])]
    return {'arrival_s': arrival - t0, 'ttft_s': None if first is None else first - arrival,
            'latency_s': end - arrival, 'tpot_s': (end - first) / (n - 1) if first is not None and n > 1 else None,
            'itl_s': itl, 'input_tokens': input_tokens, 'output_tokens': n, 'finished': finished}


# ------------------------------------------------------------------------------------- static batches

def run_offline(engine, prompts: PromptStream, batch_size: int, wl: Workload, bar=None) -> dict[str, Any]:
    """ceil(num_requests / batch_size) full batches back to back; latency counts from each batch's submission."""
    records: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for _ in range(math.ceil(wl.num_requests / batch_size)):
        for t in engine.run_batch(prompts.take(batch_size), wl.output_tokens):
            records.append(_record(t.start, t0, t.first, t.end, (), wl.input_tokens, wl.output_tokens, True))
        if bar is not None:
            bar.update(1)
    wall = time.perf_counter() - t0
    return {'batch_size': batch_size, 'num_requests': len(records), **summarize(records, wall), 'requests': records}


def poisson_arrivals(n: int, rate: float, seed: int) -> np.ndarray:
    """Arrival offsets (s) of n requests at `rate` requests/s; the first arrives at 0."""
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, n)
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])])


def run_online_static(engine, prompts: PromptStream, rate: float, wl: Workload, bar=None) -> dict[str, Any]:
    """HF fallback: Poisson arrivals; the idle engine takes up to `scheduler_batch` waiting requests as one
    blocking batch (static batching: arrivals wait for the batch in flight)."""
    arrivals = poisson_arrivals(wl.num_requests, rate, wl.seed)
    records: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    deadline = t0 + wl.online_max_seconds
    nxt = 0
    while nxt < wl.num_requests and time.perf_counter() < deadline:
        now = time.perf_counter()
        waiting = int(np.searchsorted(arrivals, now - t0, side='right')) - nxt
        if waiting <= 0:
            time.sleep(max(0.0, min(t0 + arrivals[nxt], deadline) - now))
            continue
        n = min(waiting, wl.scheduler_batch)
        for i, t in zip(range(nxt, nxt + n), engine.run_batch(prompts.take(n), wl.output_tokens)):
            records.append(_record(t0 + arrivals[i], t0, t.first, t.end, (), wl.input_tokens, wl.output_tokens,
                                   True))
        nxt += n
        if bar is not None:
            bar.update(n)
    wall = max((r['arrival_s'] + r['latency_s'] for r in records), default=time.perf_counter() - t0)
    return {'rate': rate, 'mode': 'static', 'num_requests': wl.num_requests, 'num_not_sent': wl.num_requests - nxt,
            'max_batch_size': wl.scheduler_batch, 'elapsed_s': time.perf_counter() - t0,
            **summarize(records, wall), 'requests': records}


# ------------------------------------------------------------------------------------ continuous batching

async def _one_request(engine, prompt: list[int], arrival: float, t0: float, wl: Workload, rid: str,
                       stop: asyncio.Event) -> dict[str, Any]:
    await asyncio.sleep(max(0.0, arrival - time.perf_counter()))
    chunk_times: list[float] = []
    n_tokens = 0
    finished = False
    stream = engine.stream(prompt, wl.output_tokens, rid).__aiter__()
    try:
        while True:
            nxt = asyncio.ensure_future(stream.__anext__())
            halt = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({nxt, halt}, return_when=asyncio.FIRST_COMPLETED)
            if nxt not in done:
                nxt.cancel()
                await engine.abort(rid)
                break
            halt.cancel()
            try:
                produced = nxt.result()
            except StopAsyncIteration:
                finished = True
                break
            if produced > n_tokens:  # a chunk with new tokens
                chunk_times.append(time.perf_counter())
                n_tokens = produced
    finally:
        end = time.perf_counter()
    return _record(arrival, t0, chunk_times[0] if chunk_times else None, end, chunk_times, wl.input_tokens,
                   n_tokens, finished and n_tokens == wl.output_tokens)


async def run_continuous(engine, prompts: PromptStream, rate: float, wl: Workload, seed: int) -> dict[str, Any]:
    """Poisson arrivals, each request submitted to the engine when it arrives (the engine batches continuously).

    engine.stream(prompt ids, output tokens, request id) yields the number of tokens produced so far;
    engine.abort(request id) cancels one.
    """
    arrivals = poisson_arrivals(wl.num_requests, rate, seed)
    sent = int(np.searchsorted(arrivals, wl.online_max_seconds, side='left'))  # submitted within the bound
    batch = prompts.take(sent).tolist() if sent else []
    stop = asyncio.Event()
    t0 = time.perf_counter()
    tasks = [asyncio.ensure_future(_one_request(engine, p, t0 + a, t0, wl, f'r{seed}-{rate:g}-{i}', stop))
             for i, (p, a) in enumerate(zip(batch, arrivals[:sent]))]
    deadline = t0 + wl.online_max_seconds + wl.drain
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter()))
        if pending:
            stop.set()
            await asyncio.wait(pending)
    records = [t.result() for t in tasks]
    wall = max((r['arrival_s'] + r['latency_s'] for r in records), default=time.perf_counter() - t0)
    return {'rate': rate, 'mode': 'continuous', 'num_requests': wl.num_requests, 'num_not_sent': wl.num_requests - sent,
            'elapsed_s': time.perf_counter() - t0, **summarize(records, wall), 'requests': records}


def repeated(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several repeats of one setting: means (and std) of the throughputs, medians of the latency percentiles,
    plus every repeat's aggregates."""
    keys = ('output_tokens_per_s', 'total_tokens_per_s', 'requests_per_s')
    out = {k: v for k, v in runs[0].items() if k != 'requests' and k not in keys}
    for k in keys:
        vals = [r[k] for r in runs]
        out[k] = statistics.fmean(vals)
        out[f'{k}_std'] = statistics.stdev(vals) if len(vals) > 1 else None
    for k in runs[0]:
        if k.endswith('_s') and k.split('_')[0] in ('latency', 'ttft', 'tpot', 'itl'):
            vals = [r[k] for r in runs if r[k] is not None]
            out[k] = statistics.median(vals) if vals else None
    out['num_unfinished'] = sum(r['num_unfinished'] for r in runs)
    out['num_not_sent'] = sum(r.get('num_not_sent', 0) for r in runs)
    out['repeats'] = [{k: v for k, v in r.items() if k != 'requests'} for r in runs]
    out['requests'] = runs[len(runs) // 2]['requests']
    return out


def rate_sweep(measure, wl: Workload, rates: Optional[Sequence[float]]) -> list[dict[str, Any]]:
    """measure(rate) -> repeated result at each rate; rates None: double from start_rate until saturation."""
    if rates is not None:
        return [measure(r) for r in rates]
    results, rate = [], wl.start_rate
    for _ in range(MAX_AUTO_RATES):
        results.append(measure(rate))
        if len(results) > 1:
            prev, cur = results[-2]['total_tokens_per_s'], results[-1]['total_tokens_per_s']
            if cur < prev * (1 + SATURATION_GAIN) or results[-1]['num_unfinished']:
                break
        rate *= 2
    return results


def max_throughput(model: dict[str, Any]) -> dict[str, Any]:
    """The setting with the most input + output tokens/s (the paper's headline), and its output tokens/s."""
    runs = [(r, f'batch {r["batch_size"]}') for r in model['offline']]
    runs += [(r, f'{r["rate"]:g} req/s') for r in model['online']]
    best, at = max(runs, key=lambda ra: ra[0]['total_tokens_per_s'])
    return {'max_total_tokens_per_s': best['total_tokens_per_s'],
            'max_total_tokens_per_s_std': best.get('total_tokens_per_s_std'),
            'output_tokens_per_s_at_max': best['output_tokens_per_s'],
            'max_output_tokens_per_s': max(r['output_tokens_per_s'] for r, _ in runs), 'max_at': at}
