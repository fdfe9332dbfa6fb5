"""Named tensors read one at a time: the input side of streamed export and import.

A source knows every tensor's name, shape and dtype up front (`specs`) and reads one tensor on demand
(`read`), so a writer can plan its shards before any data is read and hold one tensor (or one job) at a time.
  MemorySource       tensors already in memory (a live model's state dict): nothing is copied up front.
  SafetensorsSource  one or more .safetensors files: headers read once, each tensor read by its own
                     `safe_open`, so no mapping outlives the tensor.
  open_checkpoint    a Composer / torch checkpoint (`torch.load(mmap=True, weights_only=True)`: the optimizer
                     state and other tensors are mapped, never read) or a .safetensors file.
Imports torch, safetensors and the standard library only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from foundry_upcycle.export.writer import TORCH_DTYPES, TensorSpec


class MemorySource:
    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self._tensors = tensors
        self.specs = {k: TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()}

    def read(self, name: str) -> torch.Tensor:
        return self._tensors[name].detach()


class SafetensorsSource:
    def __init__(self, files: Mapping[str, Path] | Path, what: str = 'checkpoint'):
        """files: one .safetensors path, or {tensor name: path} from an index (every listed name must exist)."""
        from safetensors import safe_open
        listed = {} if isinstance(files, Path) else dict(files)
        paths = [files] if isinstance(files, Path) else sorted(set(listed.values()))
        self.files: dict[str, Path] = {}
        self.specs: dict[str, TensorSpec] = {}
        for path in paths:
            if not path.is_file():
                raise ValueError(f'{what}: {path} is listed in the index but missing')
            try:
                with safe_open(str(path), framework='pt') as f:
                    for name in f.keys():
                        sl = f.get_slice(name)
                        self.specs[name] = TensorSpec(name, tuple(sl.get_shape()), TORCH_DTYPES[sl.get_dtype()])
                        self.files[name] = path
            except Exception as e:  # safetensors raises its own error types
                raise ValueError(f'{what}: {path} is not a readable safetensors file ({e})') from None
        missing = sorted(set(listed) - set(self.specs))
        if missing:
            raise ValueError(f'{what}: index lists tensors not found in the shards: {missing[:5]}')

    def read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open
        with safe_open(str(self.files[name]), framework='pt') as f:
            return f.get_tensor(name)


def open_checkpoint(path: str, what: str = 'checkpoint') -> MemorySource | SafetensorsSource:
    """A Composer checkpoint, torch state dict or .safetensors file as a source; nothing is read yet."""
    from foundry_upcycle.checkpoint_io import load_state_dict, require_readable_file
    p = require_readable_file(path, what)
    if p.suffix == '.safetensors':
        return SafetensorsSource(p, what)
    return MemorySource(load_state_dict(str(p), what, mmap=True))
