"""Each arm's phase-2 lr, chosen alike for every arm on data the study does not report.

At the shortest budget (seed 0), every arm trains at each lr of the grid and is scored by its held-out domain CE on
the VALIDATION split (the test split, which the verdicts use, plays no part). An arm whose best lr is at an edge of
its grid gets the grid extended one step beyond that edge (the grid's own ratio), up to `lr_extend` times, so that
its optimum is bracketed; if it is still at the edge, the report says so. No cap applies to one arm and not the
other: the lrs may exceed the pretraining peak (the regime section says so). The choice is then checked at the
largest budget: each arm also trains there (seed 0) at its grid neighbours (`lr_check: both`), or only at the one
above (`up`, the default: the optimum grows with the budget, docs/lr_sweep.md), and the report shows whether its
shortest-budget choice is still the best of those on validation.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Optional

from foundry_upcycle.study.arms import run_name

log = logging.getLogger(__name__)

METRIC = 'ce_domain_val'


def _score(study, arm: str, budget: float, lr: float, dense, icl: bool = False) -> Optional[float]:
    """Validation CE of (arm, budget, seed 0, lr); icl: read it from the run's full evaluation (a main run)."""
    st = study.stage_arm(arm, budget, dense, 0, lr)
    value = study.stage_eval(run_name(arm, budget, lr, 0), st, icl=icl).outputs.get(METRIC)
    return value if value is not None and math.isfinite(value) else None


def _extend(grid: list[float], best: float) -> Optional[float]:
    if len(grid) < 2:
        return None
    if best == grid[0]:
        return grid[0] * grid[0] / grid[1]
    if best == grid[-1]:
        return grid[-1] * grid[-1] / grid[-2]
    return None


def select_lrs(study, dense) -> dict[str, Any]:
    """Trains the sweep, extends each arm's grid until its optimum is interior (or the extensions run out);
    returns {'budget', 'metric', 'split', 'grids', 'scores': {arm: {lr: CE}}, 'chosen', 'at_edge'}."""
    cfg = study.cfg
    b0 = min(cfg.budgets)
    grids = {arm: sorted(cfg.lr_grid) for arm in cfg.arms}
    scores: dict[str, dict[float, Optional[float]]] = {arm: {} for arm in cfg.arms}
    extensions = {arm: 0 for arm in cfg.arms}
    while True:
        todo = [(arm, b0, 0, lr) for arm in cfg.arms for lr in grids[arm] if lr not in scores[arm]]
        if not todo:
            break
        study.train_arms(todo, dense, icl=False)
        for arm, _, _, lr in todo:
            scores[arm][lr] = _score(study, arm, b0, lr, dense)
        for arm in cfg.arms:
            scored = [(ce, lr) for lr, ce in scores[arm].items() if ce is not None]
            if not scored:
                raise RuntimeError(f'lr sweep: no finite validation CE for {arm} at {grids[arm]}')
            step = _extend(grids[arm], min(scored)[1])
            if step is not None and extensions[arm] < cfg.lr_extend:
                extensions[arm] += 1
                grids[arm] = sorted(grids[arm] + [step])
                study.progress.say(f'lr sweep: {arm}\'s best lr {min(scored)[1]:g} is at the edge of {grids[arm][:-1]}'
                                   f'; extending the grid to {step:.3g}')
    chosen = {arm: min((ce, lr) for lr, ce in scores[arm].items() if ce is not None)[1] for arm in cfg.arms}
    edge = [arm for arm in cfg.arms if _extend(grids[arm], chosen[arm]) is not None]
    for arm in edge:
        log.warning('lr sweep: the best lr for %s (%g) is at the edge of its grid %s after %d extension(s); its '
                    'optimum may lie outside', arm, chosen[arm], grids[arm], extensions[arm])
    return {'budget': b0, 'seed_index': 0, 'metric': METRIC, 'split': 'validation', 'grids': grids,
            'scores': {arm: [[lr, ce] for lr, ce in sorted(scores[arm].items())] for arm in cfg.arms},
            'chosen': chosen, 'at_edge': edge}


def neighbours(grid: list[float], lr: float, mode: str) -> list[float]:
    """The lrs next to `lr` on its grid: below and above ('both'), or above only ('up'; one grid step past the top
    of the grid if `lr` is its largest)."""
    i = grid.index(lr)
    above = grid[i + 1] if i + 1 < len(grid) else lr * (grid[-1] / grid[-2] if len(grid) > 1 else 2.0)
    return ([grid[i - 1]] if mode == 'both' and i > 0 else []) + [above]


def check_keys(study, sweep: dict[str, Any]) -> list[tuple[str, float, int, float]]:
    """The runs of the largest-budget check: each arm at the neighbours of its choice (seed 0)."""
    top = max(study.cfg.budgets)
    if study.cfg.lr_check == 'off' or top == sweep['budget']:
        return []
    return [(arm, top, 0, x) for arm, lr in sweep['chosen'].items()
            for x in neighbours(sweep['grids'][arm], lr, study.cfg.lr_check)]


def check_at_top(study, sweep: dict[str, Any], dense) -> Optional[dict[str, Any]]:
    """{'budget', 'scores': {arm: [[lr, CE], ...]}, 'best': {arm: lr}, 'chosen_cost': {arm: CE(chosen) - CE(best)}}
    on validation at the largest budget; None without a check."""
    keys = check_keys(study, sweep)
    if not keys:
        return None
    top = max(study.cfg.budgets)
    scores = {arm: {lr: _score(study, arm, top, lr, dense, icl=True)} for arm, lr in sweep['chosen'].items()}
    for arm, _, _, lr in keys:
        scores[arm][lr] = _score(study, arm, top, lr, dense)
    best = {arm: min((ce, lr) for lr, ce in s.items() if ce is not None)[1] for arm, s in scores.items()}
    cost = {arm: scores[arm][sweep['chosen'][arm]] - scores[arm][best[arm]] for arm in scores}
    return {'budget': top, 'seed_index': 0, 'mode': study.cfg.lr_check,
            'scores': {a: [[lr, ce] for lr, ce in sorted(s.items())]
                                                       for a, s in scores.items()},
            'best': best, 'chosen_cost': cost}
