"""The one module that touches MegaBlocks, and only lazily: importing megablocks on a CPU-only machine breaks
`import llmfoundry` (triton finds no driver), so we probe with importlib and CUDA first."""
from __future__ import annotations

import importlib.util
import logging

log = logging.getLogger(__name__)


def megablocks_unavailable_reason() -> str | None:
    """None when `mb_dmoe` can run here, else why not."""
    if importlib.util.find_spec('megablocks') is None:
        return 'megablocks is not installed (pip install "foundry-upcycle[gpu]" on a CUDA machine)'
    import torch
    if not torch.cuda.is_available():
        return 'no CUDA device is visible'
    return None


def resolve_backend(requested: str) -> str:
    """'auto' | 'torch' | 'megablocks' -> 'torch' (llmfoundry torch_dmoe) or 'megablocks' (mb_dmoe).

    Same parameter layout either way, so checkpoints move between them; a fallback is logged, never silent.
    """
    if requested == 'torch':
        return 'torch'
    reason = megablocks_unavailable_reason()
    if reason is None:
        return 'megablocks'
    log.warning('upcycle.backend=%s: falling back from mb_dmoe to torch_dmoe because %s', requested, reason)
    return 'torch'


def import_megablocks():
    """Imports megablocks (GPU only); raises a clear error elsewhere."""
    reason = megablocks_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f'megablocks backend unavailable: {reason}')
    import megablocks
    return megablocks
