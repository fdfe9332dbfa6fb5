"""The one module that touches MegaBlocks, and only lazily: importing megablocks on a CPU-only machine breaks
`import llmfoundry` (triton finds no driver), so we probe with importlib and CUDA first.

The choice is made by the config transform, before torch.distributed is initialised, from a deterministic
per-process probe (installed packages, CUDA visible, precision): identical on identically set-up nodes. The model
(`mpt_upcycle_causal_lm`) then checks, once the process group exists, that every rank built the same FFN type.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
from typing import Optional

log = logging.getLogger(__name__)

# grouped GEMM (megablocks' `mlp_impl: grouped`) multiplies bf16 only.
MEGABLOCKS_PRECISIONS = ('amp_bf16',)
DEFAULT_PRECISION = 'amp_bf16'  # foundry's TrainConfig default


def megablocks_unavailable_reason() -> Optional[str]:
    """None when `mb_dmoe` can run here, else why not."""
    for module in ('megablocks', 'grouped_gemm'):
        if importlib.util.find_spec(module) is None:
            return f'{module} is not installed (pip install "foundry-upcycle[gpu]" on a CUDA machine)'
    import torch
    if not torch.cuda.is_available():
        return 'no CUDA device is visible'
    try:
        importlib.import_module('grouped_gemm')
    except Exception as e:  # a broken CUDA extension raises anything from ImportError to RuntimeError
        return f'grouped_gemm does not import ({type(e).__name__}: {e})'
    from llmfoundry.layers_registry import ffns_with_megablocks
    if 'mb_dmoe' not in ffns_with_megablocks:
        return 'llm-foundry did not register mb_dmoe (its `import megablocks` failed)'
    return None


def resolve_backend(requested: str, precision: Optional[str] = None) -> str:
    """'auto' | 'torch' | 'megablocks' -> 'torch' (llmfoundry torch_dmoe) or 'megablocks' (mb_dmoe).

    Same parameter layout either way, so checkpoints move between them. `auto` falls back to torch with a
    warning; an explicit `megablocks` that cannot run raises, naming why.
    """
    if requested == 'torch':
        return 'torch'
    precision = precision or DEFAULT_PRECISION
    if precision not in MEGABLOCKS_PRECISIONS:
        reason = f'precision={precision} (megablocks\' grouped GEMM needs one of {MEGABLOCKS_PRECISIONS})'
    else:
        reason = megablocks_unavailable_reason()
    if reason is None:
        return 'megablocks'
    if requested == 'megablocks':
        raise ValueError(f'upcycle.backend=megablocks cannot run here: {reason}')
    log.warning('upcycle.backend=%s: using torch_dmoe instead of mb_dmoe because %s', requested, reason)
    return 'torch'


def import_megablocks():
    """Imports megablocks (GPU only); raises a clear error elsewhere."""
    reason = megablocks_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f'megablocks backend unavailable: {reason}')
    import megablocks
    return megablocks
