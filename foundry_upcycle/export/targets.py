"""Export targets, their architectures and the dtype names the CLIs accept: one table each. Standard library only."""
from __future__ import annotations

import os
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


def engines_record(target: str, vllm_differences: dict[str, str],
                   versions: Optional[tuple[str, Optional[str]]] = None) -> dict[str, Any]:
    """engines.json: the engines that compute an export exactly (vLLM: for the versions judged), and why vLLM does
    not where it does not."""
    return {'target': target, 'architecture': ARCHITECTURES[target],
            'exact_on': [e for e in ENGINES if e != 'vllm' or not vllm_differences],
            'not_exact_on': {'vllm': vllm_differences} if vllm_differences else {},
            'vllm_versions': _range_text(versions or vllm_versions()),
            'vllm_top_k_key': VLLM_TOP_K_KEY.get(target)}


# ------------------------------------------------------------------------------------ vLLM's rope rules
# Read from vLLM's source (model_executor/layers/rotary_embedding, models/mixtral.py):
# - `dynamic` (dynamic NTK): vLLM's DynamicNTKScalingRotaryEmbedding builds one cos/sin cache for
#   max_position_embeddings x factor positions from a base scaled once for that whole length, so every position,
#   short prompts included, rotates with the scaled base; transformers (and MPT's `rope_impl: hf`) keep the original
#   base up to max_position_embeddings and rescale it per sequence length beyond. Never the same logits.
# - Mixtral: up to 0.11, vLLM's MixtralAttention called get_rope without rope_scaling (scaling ignored); from 0.12
#   mixtral.py passes `rope_parameters` (rope_scaling folded in), as llama.py does.
VLLM_MIXTRAL_ROPE_SCALING_SINCE = '0.12.0'
VLLM_VERSIONS_ENV = 'FOUNDRY_UPCYCLE_VLLM_VERSIONS'
VLLM_SUPPORTED = ('0.10.0', '1.0.0')  # [min, max): the V1 engine; bench.engines checks the installed one against it


def installed_vllm_version() -> Optional[str]:
    """The installed vLLM's version, without importing it where package metadata says; None if absent."""
    import importlib.metadata
    import importlib.util
    try:
        return importlib.metadata.version('vllm')
    except importlib.metadata.PackageNotFoundError:
        pass
    if importlib.util.find_spec('vllm') is None:
        return None
    import vllm  # a source checkout (or the tests' stub): no metadata
    return str(vllm.__version__)


def vllm_versions(spec: Optional[str] = None) -> tuple[str, Optional[str]]:
    """[low, high) of the vLLM versions an export is judged against: `spec` ('LOW' or 'LOW,HIGH'), else
    $FOUNDRY_UPCYCLE_VLLM_VERSIONS (the CLIs' --vllm-versions), else the installed vLLM exactly, else every
    version the benchmark supports."""
    from packaging.version import InvalidVersion, Version
    spec = spec if spec is not None else os.environ.get(VLLM_VERSIONS_ENV)
    if spec:
        parts = [p.strip() for p in spec.split(',')]
        try:
            if len(parts) not in (1, 2) or (len(parts) == 2 and Version(parts[0]) >= Version(parts[1])):
                raise InvalidVersion(spec)
            Version(parts[0])
        except InvalidVersion:
            raise ValueError(f"vllm versions must be 'LOW' or 'LOW,HIGH' (LOW < HIGH, PEP 440), got {spec!r}") from None
        return parts[0], parts[1] if len(parts) == 2 else VLLM_SUPPORTED[1]
    installed = installed_vllm_version()
    if installed is not None:
        return installed, None  # that version only
    return VLLM_SUPPORTED


def _range_text(versions: tuple[str, Optional[str]]) -> str:
    lo, hi = versions
    return lo if hi is None else f'>= {lo}, < {hi}'


def vllm_rope_difference(target: str, rope_scaling: Optional[dict],
                         versions: tuple[str, Optional[str]]) -> Optional[str]:
    """Why vLLM (any version in `versions`) would rotate differently from transformers, or None."""
    from packaging.version import Version
    if not rope_scaling:
        return None
    kind = rope_scaling.get('rope_type', rope_scaling.get('type'))
    if kind == 'dynamic':
        return ("'dynamic' (dynamic NTK) rope scaling: vLLM scales the base once for max_position_embeddings x factor "
                'and uses it at every position; transformers keeps the original base up to max_position_embeddings')
    if target == 'mixtral' and Version(versions[0]) < Version(VLLM_MIXTRAL_ROPE_SCALING_SINCE):
        return (f"{kind!r} rope scaling: vLLM's Mixtral ignores rope_scaling before {VLLM_MIXTRAL_ROPE_SCALING_SINCE} "
                f'(judged for vLLM {_range_text(versions)}; name the versions that will serve it with '
                f'--vllm-versions or ${VLLM_VERSIONS_ENV}, e.g. {VLLM_MIXTRAL_ROPE_SCALING_SINCE})')
    return None


def refuse_or_warn(what: str, diffs: dict[str, str], allow_inexact_engines: bool, log) -> None:
    """The one rule for export and import-hf: a model vLLM would compute differently is refused, naming each key,
    unless the user allows transformers-only outputs (then each key is logged as a warning)."""
    if diffs and not allow_inexact_engines:
        raise ValueError(f'{what} would load in vLLM but compute another function:\n  - '
                         + '\n  - '.join(f'{k}: {v}' for k, v in diffs.items())
                         + '\nchange the model, or pass allow_inexact_engines / --allow-inexact-engines to write '
                         'it for transformers only')
    for key, why in diffs.items():
        log.warning('%s for transformers only: vLLM would compute it differently (%s: %s)', what, key, why)
