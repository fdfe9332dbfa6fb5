"""Where a study sits against the paper: base tokens per parameter, base domain CE against chance, CPT's slope per
doubling of tokens, phase-2 lrs against the pretraining peak; a label and the reasons it is not the paper's regime."""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

from foundry_upcycle.study import stats

PAPER_TOKENS_PER_PARAM = (100, 460)      # Table 2: 436M x 100 / 200 / 460 ... 1.4B x 100 / 250
PAPER_CPT_SLOPE = (0.014, 0.025)         # nats of CE per doubling of CPT tokens, read off the paper's curves
OVERTRAINED_TOKENS_PER_PARAM = 60        # below this the base is not in the paper's regime
NEAR_CHANCE = 0.9                        # base domain CE above this fraction of ln(V): the base barely knows the domain
PAPER_MIN_BUDGET = 0.1                   # the paper's smallest phase-2 budget, a fraction of the pretraining FLOPs


def regime(dense: Mapping[str, Any], arms: list[Mapping[str, Any]], vocab_size: Optional[int],
           pretrain_lr: Optional[float], lrs: Mapping[str, float]) -> dict[str, Any]:
    """Where this study sits against the paper: base tokens/param, base domain CE vs chance, CPT slope."""
    tpp = dense['pretrain_tokens'] / dense['params'] if dense.get('params') else None
    chance = math.log(vocab_size) if vocab_size else None
    base_ce = (dense.get('eval') or {}).get('ce_domain')
    cpt = sorted((a['tokens'], a['eval'].get('ce_domain')) for a in arms if a['arm'] == 'cpt')
    slope = stats.doubling_slope(cpt)
    overtrained = tpp is not None and tpp >= OVERTRAINED_TOKENS_PER_PARAM
    knows_domain = base_ce is not None and chance is not None and base_ce < NEAR_CHANCE * chance
    lrs_below_peak = pretrain_lr is None or all(lr < pretrain_lr for lr in lrs.values())
    reasons = []
    budget = max((a['budget'] for a in arms if a.get('budget') is not None), default=None)
    if budget is not None and budget < PAPER_MIN_BUDGET:     # e.g. a real base on a CPU (study --hf-base)
        reasons.append(f'the largest budget, {budget:g} of the base\'s pretraining FLOPs, is far below the paper\'s '
                       f'{PAPER_MIN_BUDGET:g}-1.0: phase 2 barely moves the base')
    if not overtrained:
        reasons.append(f'the base saw {tpp:.3g} tokens per parameter (the paper: {PAPER_TOKENS_PER_PARAM[0]}-'
                       f'{PAPER_TOKENS_PER_PARAM[1]}; this study needs >= {OVERTRAINED_TOKENS_PER_PARAM})'
                       if tpp is not None else 'the base\'s pretraining length is unknown')
    if not knows_domain:
        reasons.append('the base is near chance on the domain (held-out domain CE '
                       f'{base_ce if base_ce is not None else float("nan"):.3f} vs ln V = '
                       f'{chance if chance is not None else float("nan"):.3f}): phase 2 learns the domain from '
                       'scratch, the most data-bound task there is')
    notes = []
    if not lrs_below_peak:     # both arms' lrs come from one rule (validation), so this binds neither arm
        notes.append(f'a phase-2 lr ({", ".join(f"{k} {v:g}" for k, v in lrs.items())}) is not below the '
                     f'pretraining peak {pretrain_lr:g}, unlike the paper\'s; each arm\'s lr is its optimum on '
                     'validation, found the same way for every arm')
    return {
        'base_tokens_per_param': tpp, 'paper_tokens_per_param': list(PAPER_TOKENS_PER_PARAM),
        'base_ce_domain': base_ce, 'chance_ce': chance, 'vocab_size': vocab_size,
        'cpt_slope_per_doubling': slope, 'paper_cpt_slope_per_doubling': list(PAPER_CPT_SLOPE),
        'pretrain_lr': pretrain_lr, 'phase2_lrs': dict(lrs), 'lrs_below_peak': lrs_below_peak,
        'tests_paper_claim': not reasons, 'why_not': reasons, 'deviations': notes,
        'label': 'paper regime (over-trained base)' if not reasons else 'not the paper\'s regime',
    }
