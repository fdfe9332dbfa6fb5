"""Registered model `hf_upcycle_causal_lm`: foundry's `hf_causal_lm` building the upcycled Mixtral of a dense
Llama / Mistral checkpoint.

The transform (`upcycle:` block on an `hf_causal_lm` recipe) renames the model and passes `upcycle:` options here.
The model builds a transformers `MixtralForCausalLM` from the dense `config.json` (`llama_to_mixtral.mixtral_config`:
rope, norm eps, tied embeddings, sliding window, GQA), with no weights read: the `upcycle_loader` callback tiles
the dense weights in at BEFORE_LOAD (nothing E-times larger is written to disk), or Composer's autoresume loads
the run's own checkpoint.

The router load-balancing loss (`router_aux_loss_coef` = `load_balancing_loss_weight`) is on only in training:
`forward` asks for router logits when the model trains, so the saved config (`output_router_logits: false`) serves
(`generate` with a KV cache) and evaluation computes the language loss alone. `loss` returns {'loss', 'lbl',
'total'}, logged apart by Composer as `loss/train/*`.
"""
from __future__ import annotations

import contextvars
from typing import Any, Mapping, Optional, Union

import torch
from llmfoundry.models.hf import ComposerHFCausalLM

MODEL_NAME = 'hf_upcycle_causal_lm'
# config_overrides keys the upcycle block decides (the MoE shape and its training switches).
BLOCK_OWNED_OVERRIDES = ('num_local_experts', 'num_experts_per_tok', 'router_aux_loss_coef', 'router_jitter_noise',
                         'output_router_logits')
_BUILDING: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar('hf_upcycle_options', default=None)


def check_upcycle_options(options: Mapping[str, Any]) -> dict[str, Any]:
    known = {'num_experts', 'top_k', 'load_balancing_loss_weight'}
    variants = {'granularity': 1, 'grow': 1}      # optional (issue 17): fine-grained experts, a grown Mixtral
    unknown = sorted(set(options) - known - set(variants))
    if unknown or not known <= set(options):
        raise ValueError(f'model.upcycle: expected {sorted(known)} (and optionally {sorted(variants)}), '
                         f'got {sorted(options)}')
    return {**variants, **options}


class ComposerHFUpcycleCausalLM(ComposerHFCausalLM):

    def __init__(self, *args: Any, upcycle: Mapping[str, Any], config_overrides: Optional[dict] = None,
                 pretrained: bool = True, **kwargs: Any):
        """upcycle: {num_experts, top_k, load_balancing_loss_weight}. `pretrained` is accepted (the CPT recipe's
        value) but no weights are read here: the upcycle_loader callback tiles them in."""
        options = check_upcycle_options(upcycle)
        owned = sorted(set(config_overrides or {}) & set(BLOCK_OWNED_OVERRIDES))
        if owned:
            raise ValueError(f'model.config_overrides {owned}: set by the upcycle block; remove them from the recipe')
        token = _BUILDING.set({**options, 'config_overrides': dict(config_overrides or {})})
        try:
            super().__init__(*args, pretrained=False, config_overrides=config_overrides, **kwargs)
        finally:
            _BUILDING.reset(token)
        self.load_balancing_loss_weight = float(options['load_balancing_loss_weight'])
        self.expert_layout = (int(options['granularity']), int(options['grow']))   # the router monitor's spread

    @classmethod
    def build_config(cls, pretrained_model_name_or_path: str, trust_remote_code: bool, use_auth_token: bool,
                     attn_implementation: str, config_overrides: dict[str, Any]):
        """The dense config (with the recipe's overrides) -> the upcycled MixtralConfig."""
        from llmfoundry.utils.config_utils import set_config_overrides

        from foundry_upcycle.llama_to_mixtral import check_dense_config, upcycled_mixtral_config
        options = _BUILDING.get()
        assert options is not None, f'{cls.__name__}.build_config called outside __init__'
        dense = super().build_config(pretrained_model_name_or_path, trust_remote_code, use_auth_token,
                                     attn_implementation, config_overrides).to_dict()
        if dense.get('model_type') != 'mixtral':   # a Mixtral source is grown (grow > 1, checked by the transform)
            check_dense_config(dense, f'model.pretrained_model_name_or_path {pretrained_model_name_or_path}')
        config = upcycled_mixtral_config(dense, options['num_experts'], options['top_k'], options['granularity'],
                                         options['grow'], options['load_balancing_loss_weight'],
                                         dtype=dense.get('torch_dtype'))
        set_config_overrides(config, options['config_overrides'])
        config.use_cache = False
        config._attn_implementation = attn_implementation
        return config

    def forward(self, batch: Mapping):
        inputs = {k: v for k, v in batch.items() if k in self.model_forward_args}
        if self.model.training and self.load_balancing_loss_weight > 0:
            inputs['output_router_logits'] = True
        return self.model(**inputs)

    def loss(self, outputs: Any, batch: Mapping) -> Union[dict, torch.Tensor]:
        total = outputs['loss']
        aux = outputs.get('aux_loss') if self.model.training else None
        if aux is None:
            return total
        if torch.is_grad_enabled() and not aux.requires_grad:
            raise ValueError(
                'router logits carry no gradient, so the load-balancing loss would not train the router: reentrant '
                'activation checkpointing runs the forward under no_grad; set '
                'fsdp_config.activation_checkpointing_reentrant: false',
            )
        lbl = self.model.router_aux_loss_coef * aux.to(total.device)  # as transformers adds it to `loss`
        return {'loss': total - lbl, 'lbl': lbl, 'total': total}
