"""The phase-2 lr sweep: each arm at every lr of `cfg.lr_sweep`, smallest budget, seed 0; the best held-out domain
CE wins for that arm, and an optimum at the edge of the grid is flagged."""
from __future__ import annotations

import logging
import math
from typing import Any

from foundry_upcycle.study.arms import run_name

log = logging.getLogger(__name__)


def lr_sweep(study, dense) -> dict[str, Any]:
    """{'budget', 'rows': [{'lr', arm: CE, ...}], 'chosen': {arm: lr}, 'at_edge': [arm, ...]}."""
    cfg = study.cfg
    b0 = min(cfg.budgets)
    rows = []
    study.train_arms([(arm, b0, 0, lr) for lr in cfg.lr_sweep for arm in cfg.arms], dense, icl=False)
    for lr in cfg.lr_sweep:
        row: dict[str, Any] = {'lr': lr}
        for arm in cfg.arms:
            st = study.stage_arm(arm, b0, dense, 0, lr)
            ev = study.stage_eval(run_name(arm, b0, lr, 0), st, icl=False)
            row[arm] = ev.outputs.get('ce_domain')
        rows.append(row)
    chosen, edge = {}, []
    for arm in cfg.arms:
        scored = [(r[arm], r['lr']) for r in rows if r[arm] is not None and math.isfinite(r[arm])]
        if not scored:
            raise RuntimeError(f'lr sweep: no finite held-out domain CE for {arm}')
        chosen[arm] = min(scored)[1]
        if chosen[arm] in (min(cfg.lr_sweep), max(cfg.lr_sweep)):
            edge.append(arm)
            log.warning('lr sweep: the best lr for %s (%g) is at the edge of the sweep %s; the optimum may lie '
                        'outside it', arm, chosen[arm], list(cfg.lr_sweep))
    return {'budget': b0, 'rows': rows, 'chosen': chosen, 'at_edge': edge}
