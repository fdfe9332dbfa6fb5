"""Writing weights-only checkpoints atomically. Reading lives in `reader.py` (the one streamed reader); its
`load_state_dict` and `require_readable_file` are re-exported here for existing callers.
Imports torch and safetensors only.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from foundry_upcycle.atomic import atomic_write
from foundry_upcycle.reader import load_pickle_safely, load_state_dict, require_readable_file  # noqa: F401


def save_composer_weights(state_dict: Mapping[str, torch.Tensor], path: str,
                          metadata: Optional[dict[str, Any]] = None) -> None:
    """Writes a weights-only Composer checkpoint (loadable with `load_path` + `load_weights_only: true`) atomically."""
    payload = {'state': {'model': dict(state_dict), 'integrations': {}, 'metadata': metadata or {}}}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: str, metadata: Optional[dict[str, str]] = None):
    from safetensors.torch import save_file
    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in state_dict.items()}, tmp, metadata))
