"""Export targets, their architectures and the dtype names the CLIs accept: one table each. Standard library only."""
from __future__ import annotations

from typing import Any, Optional

TARGETS = ('auto', 'llama', 'mistral', 'mixtral', 'dbrx')
ARCHITECTURES = {'llama': 'LlamaForCausalLM', 'mistral': 'MistralForCausalLM', 'mixtral': 'MixtralForCausalLM',
                 'dbrx': 'DbrxForCausalLM'}
# accepted name -> torch dtype attribute
DTYPE_NAMES = {'float32': 'float32', 'fp32': 'float32', 'bfloat16': 'bfloat16', 'bf16': 'bfloat16',
               'float16': 'float16', 'fp16': 'float16'}
# Serving engines an export is checked against; transformers is exact by construction (the exporter refuses
# what it cannot represent), vLLM is checked per export (`hf_export.engine_support`).
ENGINES = ('transformers', 'vllm')


def parse_dtype(name: Optional[str]) -> Any:
    """'bf16' / 'bfloat16' / 'fp32' / ... -> torch dtype; None keeps the checkpoint's dtype."""
    if name is None:
        return None
    if name not in DTYPE_NAMES:
        raise ValueError(f'dtype must be one of {sorted(DTYPE_NAMES)}, got {name!r}')
    import torch
    return getattr(torch, DTYPE_NAMES[name])


ENGINES_FILE = 'engines.json'
VLLM_TOP_K_KEY = {'mixtral': 'num_experts_per_tok', 'dbrx': 'ffn_config.moe_top_k'}


def engines_record(target: str, vllm_differences: dict[str, str]) -> dict[str, Any]:
    """engines.json: the engines that compute an export exactly, and why vLLM does not where it does not."""
    return {'target': target, 'architecture': ARCHITECTURES[target],
            'exact_on': [e for e in ENGINES if e != 'vllm' or not vllm_differences],
            'not_exact_on': {'vllm': vllm_differences} if vllm_differences else {},
            'vllm_top_k_key': VLLM_TOP_K_KEY.get(target)}
