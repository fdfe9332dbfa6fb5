"""Break-even arithmetic of the cost report: where the CPT quality-vs-compute curve reaches the upcycled quality
(measured, interpolated, extrapolated or never), the extra CPT training that takes, and the lifetime demand at which
the two options cost the same."""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

FAR_EXTRAPOLATION = 10.0  # beyond this multiple of the largest CPT compute, an extrapolation is flagged


def match_compute(flops: Sequence[float], loss: Sequence[float], start: int, target: float, tail_points: int,
                  saturation_tol: float) -> dict[str, Any]:
    """Training compute at which the CPT curve (sorted by compute; lower loss is better) first reaches `target`,
    searching from point `start` (the CPT run at the upcycled model's budget) onwards.

    status: 'not_needed' (CPT at `start` is already as good), 'interpolated' (piecewise-linear in log compute),
    'extrapolated' (past the last point along a least-squares line over the last `tail_points` points),
    'never' (that line improves by less than `saturation_tol` per doubling of compute: CPT has saturated),
    'unknown' (a single CPT point, nothing to extrapolate from).
    """
    out: dict[str, Any] = {'cpt_train_flops_needed': None, 'extrapolation_factor': None,
                           'improvement_per_doubling': None}
    if loss[start] <= target:
        return {**out, 'status': 'not_needed', 'cpt_train_flops_needed': flops[start],
                'note': 'CPT at the same budget is already as good'}
    for i in range(start, len(flops) - 1):
        if loss[i + 1] <= target:
            frac = (loss[i] - target) / (loss[i] - loss[i + 1])
            log_c = math.log(flops[i]) + frac * (math.log(flops[i + 1]) - math.log(flops[i]))
            return {**out, 'status': 'interpolated', 'cpt_train_flops_needed': math.exp(log_c),
                    'note': f'interpolated between CPT runs at {flops[i]:.3g} and {flops[i + 1]:.3g} FLOPs'}
    n = min(max(tail_points, 2), len(flops))
    if n < 2:
        return {**out, 'status': 'unknown', 'note': 'a single CPT budget: cannot extrapolate the CPT curve'}
    xs = [math.log2(c) for c in flops[-n:]]
    slope = _slope(xs, loss[-n:])
    gain = round(-slope, 12) + 0.0  # no '-0' for a flat line
    out['improvement_per_doubling'] = gain
    if gain < saturation_tol:
        return {**out, 'status': 'never',
                'note': f'CPT has saturated: over its last {n} budgets it improves by {gain:.3g} per doubling of '
                        f'compute (< {saturation_tol:g}), short of the upcycled quality'}
    doublings = (loss[-1] - target) / gain
    factor = 2.0 ** doublings
    note = f'extrapolated {factor:.3g}x past the largest CPT run along the fit over its last {n} budgets'
    if factor > FAR_EXTRAPOLATION:
        note += f' (more than {FAR_EXTRAPOLATION:g}x: unreliable)'
    return {**out, 'status': 'extrapolated', 'cpt_train_flops_needed': flops[-1] * factor,
            'extrapolation_factor': factor, 'note': note}


def _slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var > 0 else 0.0


def _verdicts(out: dict[str, Any], basis: str, status: str, extra: Optional[float], delta: float,
              train_tokens: float) -> None:
    tokens, verdict = _tokens_and_verdict(status, extra, delta)
    out[f'tokens_{basis}'] = tokens
    out[f'tokens_{basis}_per_training_token'] = None if tokens is None else tokens / train_tokens
    out[f'verdict_{basis}'] = verdict


def break_even(match: dict[str, Any], c_budget: float, df: dict[str, float], train_tokens: float) -> dict[str, Any]:
    out = dict(match)
    needed = match['cpt_train_flops_needed']
    extra = None if needed is None else max(needed - c_budget, 0.0)
    out.update(extra_train_flops=extra, extra_train_flops_ratio=None if extra is None else extra / c_budget)
    for basis, delta in df.items():
        _verdicts(out, basis, match['status'], extra, delta, train_tokens)
    return out


def seconds_break_even(out: dict[str, Any], curve: dict[str, list], start: int, losses: list[float], target: float,
                        up_seconds: Optional[float], extra_per_token: float, train_tokens: float,
                        tail_points: int, saturation_tol: float) -> None:
    """The seconds basis, into `out`: CPT training seconds to reach `target`, minus the upcycled run's seconds,
    over the extra serving seconds per processed token."""
    seconds = curve['train_seconds']
    if up_seconds is None or any(t is None for t in seconds):
        out.update(seconds_status='missing', tokens_seconds=None, tokens_seconds_per_training_token=None,
                   extra_train_seconds=None, cpt_train_seconds_needed=None,
                   verdict_seconds='no seconds basis (train_seconds missing from results.json)')
        return
    match = match_compute(seconds, losses, start, target, tail_points, saturation_tol)
    needed = match['cpt_train_flops_needed']  # in seconds here
    extra = None if needed is None else max(needed - up_seconds, 0.0)
    out.update(seconds_status=match['status'], cpt_train_seconds_needed=needed, extra_train_seconds=extra,
               upcycle_train_seconds=up_seconds)
    if match['status'] == 'not_needed' and extra:
        match['status'] = 'interpolated'  # CPT is as good but took longer to train: demand decides
    _verdicts(out, 'seconds', match['status'], extra, extra_per_token, train_tokens)


def _tokens_and_verdict(status: str, extra: Optional[float], delta: float) -> tuple[Optional[float], str]:
    if status == 'not_needed':
        return 0.0, 'dense CPT cheaper at any demand (already as good)'
    if status == 'never':
        return None, 'never (CPT saturates short of the upcycled quality)'
    if status == 'unknown':
        return None, 'unknown (one CPT budget)'
    if delta <= 0:
        return None, 'never (the MoE costs no more per token)'
    tokens = extra / delta
    return tokens, f'dense CPT cheaper beyond {tokens:.3g} tokens processed'

