"""Reading model weights from the files a user points us at, without unpickling arbitrary objects.

Formats: a Composer checkpoint (`.pt`, model under `state.model`), a plain `torch.save`d state dict, or
a `.safetensors` file. Pickles are read with `torch.load(weights_only=True)`; the only non-tensor globals
allowed are the inert ones Composer writes (timedelta timestamps, numpy RNG state, torch version).
Imports torch, numpy and safetensors only.
"""
from __future__ import annotations

import datetime
import os
import pickle
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch

from foundry_upcycle.atomic import atomic_write

SAFE_COMPOSER_GLOBALS = [
    datetime.timedelta,
    np.dtype,
    np.ndarray,
    np.core.multiarray._reconstruct,  # type: ignore[attr-defined]
    torch.torch_version.TorchVersion,
] + [type(np.dtype(t)) for t in ('uint32', 'int64', 'float64', 'bool')]


def require_readable_file(path: str, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f'{what}: {path} does not exist')
    if p.is_dir():
        raise ValueError(f'{what}: {path} is a directory, expected a checkpoint file (.pt or .safetensors)')
    if not os.access(p, os.R_OK):
        raise ValueError(f'{what}: {path} is not readable')
    return p


def load_pickle_safely(path: Path, what: str, mmap: bool = False) -> Any:
    """mmap=True maps the tensors' storage instead of reading it (zip-format files, as torch.save writes)."""
    try:
        with torch.serialization.safe_globals(SAFE_COMPOSER_GLOBALS):
            return torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        unsafe = [line.strip() for line in str(e).splitlines() if 'Unsupported global' in line]
        if not unsafe:
            raise ValueError(f'{what}: {path} is not a readable torch checkpoint ({str(e).splitlines()[-1]})') from None
        raise ValueError(
            f'{what}: {path} holds objects that are not plain weights; refusing to unpickle them '
            f'(weights_only=True). Re-save the state dict as safetensors. Detail: {unsafe[0][:200]}',
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f'{what}: {path} is not a readable torch checkpoint ({e})') from None


def load_state_dict(path: str, what: str = 'checkpoint', mmap: bool = False) -> dict[str, torch.Tensor]:
    """The model state dict stored in `path` (Composer checkpoint, torch state dict or safetensors).

    mmap=True (torch files): tensors are mapped from the file, not read, so nothing else in it (optimizer
    state) is materialised and each tensor is read when used.
    """
    p = require_readable_file(path, what)
    if p.suffix == '.safetensors':
        from safetensors.torch import load_file
        try:
            return load_file(str(p))
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f'{what}: {path} is not a readable safetensors file ({e})') from None
    obj = load_pickle_safely(p, what, mmap=mmap)
    if isinstance(obj, Mapping) and isinstance(obj.get('state'), Mapping) and 'model' in obj['state']:
        obj = obj['state']['model']
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f'{what}: {path} is neither a Composer checkpoint nor a state dict of tensors')
    return dict(obj)


def save_composer_weights(state_dict: Mapping[str, torch.Tensor], path: str,
                          metadata: Optional[dict[str, Any]] = None) -> None:
    """Writes a weights-only Composer checkpoint (loadable with `load_path` + `load_weights_only: true`) atomically."""
    payload = {'state': {'model': dict(state_dict), 'integrations': {}, 'metadata': metadata or {}}}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: str, metadata: Optional[dict[str, str]] = None):
    from safetensors.torch import save_file
    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in state_dict.items()}, tmp, metadata))
