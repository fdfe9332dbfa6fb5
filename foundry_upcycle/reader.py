"""The one streamed reader: model weights from the files a user points us at, tensor by tensor, never unpickling
arbitrary objects.

`open_source(path)` returns a tensor source (`specs` up front, `read(name)` on demand) for:
  - a Hugging Face directory: `model.safetensors`, or shards listed in `model.safetensors.index.json`;
  - a `.safetensors` file;
  - a Composer checkpoint (`.pt`, model under `state.model`) or a plain `torch.save`d state dict, loaded with
    `torch.load(mmap=True, weights_only=True)`: tensors stay on disk until read, so the optimizer state is never
    read. The only non-tensor globals allowed are the inert ones Composer writes (timedelta timestamps, numpy RNG
    state, torch version).
Safetensors are read through their headers first, then one tensor per `safe_open`, so no mapping outlives a tensor.
Imports torch, numpy and safetensors only.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Mapping, Union

import numpy as np
import torch

from foundry_upcycle.jobs import TORCH_DTYPES, MemorySource, TensorSpec

log = logging.getLogger(__name__)

INDEX_NAME = 'model.safetensors.index.json'
SINGLE_NAME = 'model.safetensors'

try:  # numpy >= 2 (numpy.core is a deprecated alias there)
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]

SAFE_COMPOSER_GLOBALS = [
    datetime.timedelta,
    np.dtype,
    np.ndarray,
    _reconstruct,
    # numpy 1.x pickles (e.g. Composer's RNG state) name it by its old module; the weights-only unpickler matches names.
    (_reconstruct, 'numpy.core.multiarray._reconstruct'),
    (_reconstruct, 'numpy._core.multiarray._reconstruct'),
    torch.torch_version.TorchVersion,
] + [type(np.dtype(t)) for t in ('uint32', 'int64', 'float64', 'bool')]


class SafetensorsSource:
    """One or more .safetensors files: headers read once, each tensor read by its own `safe_open`."""

    def __init__(self, files: Union[Mapping[str, Path], Path], what: str = 'checkpoint'):
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


def require_readable_file(path: str, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f'{what}: {path} does not exist')
    if p.is_dir():
        raise ValueError(f'{what}: {path} is a directory, expected a checkpoint file (.pt or .safetensors)')
    if not os.access(p, os.R_OK):
        raise ValueError(f'{what}: {path} is not readable')
    return p


def hf_weight_files(directory: Path, what: str) -> Union[dict[str, Path], Path]:
    """A Hugging Face directory's safetensors: {name: shard} from its index, or its single file."""
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())['weight_map']
        except (ValueError, KeyError) as e:
            raise ValueError(f'{what}: {index} is not a safetensors index ({e})') from None
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / SINGLE_NAME
    if single.is_file():
        return single
    raise ValueError(f'{what}: {directory} has neither {SINGLE_NAME} nor {INDEX_NAME}; only safetensors checkpoints '
                     'are read (pickled .bin files are not)')


def open_source(path: Union[str, os.PathLike], what: str = 'checkpoint') -> Union[MemorySource, SafetensorsSource]:
    """The weights at `path` (HF directory, .safetensors, Composer / torch .pt) as a source; nothing is read yet."""
    p = Path(path).expanduser()
    if p.is_dir():
        return SafetensorsSource(hf_weight_files(p, what), what)
    p = require_readable_file(str(path), what)
    if p.suffix == '.safetensors':
        return SafetensorsSource(p, what)
    return MemorySource(_model_tensors(load_pickle_safely(p, what, mmap=True), p, what))


def load_state_dict(path: str, what: str = 'checkpoint', mmap: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of the model stored at `path`, in memory (small models, tests). With `mmap`, a .pt file's
    tensors stay memory-mapped (read when touched)."""
    source = open_source(path, what)
    if mmap and isinstance(source, MemorySource):
        return dict(source._tensors)
    return {name: source.read(name) for name in source.specs}


def _model_tensors(obj: Any, path: Path, what: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and isinstance(obj.get('state'), Mapping) and 'model' in obj['state']:
        obj = obj['state']['model']
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f'{what}: {path} is neither a Composer checkpoint nor a state dict of tensors')
    return dict(obj)


def load_pickle_safely(path: Path, what: str, mmap: bool = False) -> Any:
    """`torch.load(weights_only=True)`; with `mmap`, tensors stay on disk until touched (so the optimizer state
    of a Composer checkpoint is never read into memory). Files in torch's legacy format cannot be mmapped."""
    try:
        with torch.serialization.safe_globals(SAFE_COMPOSER_GLOBALS):
            if mmap and zipfile.is_zipfile(path):
                return torch.load(path, map_location='cpu', weights_only=True, mmap=True)
            if mmap:
                log.warning('%s: %s is in torch\'s legacy (non-zip) format and cannot be memory-mapped; reading it whole',
                            what, path)
            return torch.load(path, map_location='cpu', weights_only=True)
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
