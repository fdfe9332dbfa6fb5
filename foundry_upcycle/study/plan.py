"""The study's plan, known before any training: every arm's resolved model, FLOPs per token, and steps at matched
training FLOPs per budget (`flops.matched_steps`, the one function that rounds a budget to steps)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from foundry_upcycle.study import arms, hf_base
from foundry_upcycle.study.recipes import RunBuilder, moe_model_config, run_lr


@dataclass
class StudyPlan:
    """Resolved recipes' shapes, FLOPs per token, steps per arm and budget, and each arm's lr before any sweep."""
    arms: tuple[str, ...]
    seq_len: int
    tokens_per_step: int
    pretrain_steps: Optional[int]
    pretrain_tokens: int
    pretrain_lr: Optional[float]
    dense_model: dict[str, Any]
    models: dict[str, dict[str, Any]]             # arm -> model block (torch backend for an MoE)
    blocks: dict[str, dict[str, Any]]             # MoE arm -> its effective upcycle block (recipe + overrides)
    flops: dict[str, float]                       # arm -> training FLOPs per token
    params: dict[str, tuple[int, int]]            # arm -> (total, active)
    steps: dict[tuple[str, float], int]
    target_tokens: dict[tuple[str, float], int]
    lrs: dict[str, float]

    @property
    def token_ratio(self) -> float:
        """The primary upcycled arm's tokens over CPT's at matched FLOPs."""
        return self.flops[arms.BASELINE] / self.flops[arms.PRIMARY]

    @property
    def upcycle_block(self) -> dict[str, Any]:
        return self.blocks[arms.PRIMARY]

    @property
    def moe_model(self) -> dict[str, Any]:
        return self.models[arms.PRIMARY]


def timing_models(plan: StudyPlan) -> dict[str, dict[str, Any]]:
    """Each arm's model block as trained (an upcycled one with its load-balancing loss), torch backend."""
    if hf_base.is_hf_model(plan.dense_model):   # the hf_upcycle_causal_lm block holds its loss weight already
        return {a: plan.models[a] for a in plan.arms}
    from foundry_upcycle.config import UpcycleConfig
    from foundry_upcycle.transforms import upcycled_model_config
    return {a: (upcycled_model_config(plan.dense_model, UpcycleConfig.from_mapping(plan.blocks[a]), 'torch')
                if a in plan.blocks else plan.dense_model) for a in plan.arms}


def make_plan(builder: RunBuilder, pretrain_steps_of) -> StudyPlan:
    """Resolves the recipes and computes every arm's steps; ValueError for anything the recipes refuse.
    `pretrain_steps_of(tokens_per_step, dense_params)`: the dense base's steps when the study pretrains it."""
    from foundry_upcycle.study.flops import matched_steps, matched_tokens, param_counts, train_flops_per_token
    cfg = builder.cfg
    resolved = {a: builder.resolve(builder.spec(a, 1, 'plan', '<dense>'), placeholders=True) for a in cfg.arms}
    base = resolved[arms.BASELINE]
    dense_model = dict(base['model'])
    models, blocks = {}, {}
    for a, run in resolved.items():
        if run['model'] != dense_model:
            raise ValueError('recipes.cpt and recipes.upcycle must have the same model block (the upcycling recipe '
                             'is the CPT recipe plus one upcycle block)')
        if arms.get(a).is_moe:
            blocks[a] = {k: v for k, v in run['upcycle'].items() if k != 'from'}
            models[a] = (hf_base.moe_model(dense_model, blocks[a], cfg.hf_base) if cfg.hf_base else
                         moe_model_config(dense_model, blocks[a]))
        else:
            models[a] = dense_model
    if hf_base.is_hf_model(dense_model) != bool(cfg.hf_base):
        raise ValueError(f'recipes.cpt: model.name {dense_model.get("name")!r} ' + (
            'is not hf_causal_lm; a study on hf_base trains with the yamls/hf recipes' if cfg.hf_base else
            'reads a Hugging Face directory; give it as hf_base (--hf-base), the study\'s real base'))
    # what the counts read: the model blocks (MPT), or the transformers configs the models build (hf_base)
    counted = hf_base.counted_configs(models, cfg.hf_base) if cfg.hf_base else models
    seq = int(base['max_seq_len'])
    tokens_per_step = int(base['global_train_batch_size']) * seq
    params = {a: param_counts(m) for a, m in counted.items()}
    pretrain_steps, pretrain_lr = None, None
    if cfg.pretrains:
        pretrain_steps = pretrain_steps_of(tokens_per_step, params[arms.BASELINE][0])
        pre = builder.resolve(builder.spec('pretrain', pretrain_steps, 'plan'), placeholders=True)
        if int(pre['max_seq_len']) != seq or pre['model'] != dense_model:
            raise ValueError('recipes.pretrain and recipes.cpt must train the same model at the same max_seq_len '
                             '(CPT continues the pretrained checkpoint)')
        pretrain_tokens = pretrain_steps * int(pre['global_train_batch_size']) * seq
        pretrain_lr = float(pre['optimizer']['lr'])
    else:
        pretrain_tokens = cfg.pretrain_tokens
    flops = {a: train_flops_per_token(m, seq) for a, m in counted.items()}
    steps, targets = {}, {}
    dense_counted = counted[arms.BASELINE]
    for b in cfg.budgets:
        for a in cfg.arms:
            i = 0 if a == arms.BASELINE else 1
            steps[(a, b)] = matched_steps(dense_counted, counted[a], b, pretrain_tokens, seq, tokens_per_step)[i]
            targets[(a, b)] = matched_tokens(dense_counted, counted[a], b, pretrain_tokens, seq)[i]
    lrs = {a: _lr(cfg, run, arms.get(a).is_moe) for a, run in resolved.items()}
    return StudyPlan(tuple(cfg.arms), seq, tokens_per_step, pretrain_steps, pretrain_tokens, pretrain_lr, dense_model,
                     models, blocks, flops, params, steps, targets, lrs)


def _lr(cfg, run: dict[str, Any], moe: bool) -> float:
    """An arm's lr before any sweep: --upcycle-lr, else the recipe's upcycle.lr, for an upcycled arm; --lr, else
    the recipe's optimizer lr, otherwise."""
    block_lr = (run.get('upcycle') or {}).get('lr')
    if moe and (cfg.upcycle_lr or block_lr is not None):
        return float(cfg.upcycle_lr or block_lr)
    return float(cfg.lr or run_lr(run))
