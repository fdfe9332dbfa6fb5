"""Which blocks of a model hold the mixture of experts (`upcycle.moe_layers`). Pure Python.

  None      every block (the paper's recipe)
  n >= 1    blocks 0, n, 2n, ... (one MoE block in every n, as Megatron-Core's `moe_layer_freq`)
  [i, ...]  exactly those blocks
The other blocks keep the dense FFN. MPT expresses this through `mpt_upcycle_causal_lm` (model.py); Mixtral and DBRX
cannot (an MoE in every block).
"""
from __future__ import annotations

from typing import Any, Union

MoeLayers = Union[None, int, tuple[int, ...]]


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_moe_layers(value: Any, key: str = 'moe_layers') -> MoeLayers:
    """The validated value (a list becomes a sorted tuple); ValueError naming `key` otherwise."""
    if value is None or (_is_int(value) and value >= 1):
        return value
    if isinstance(value, (list, tuple)) and value and all(_is_int(i) and i >= 0 for i in value) \
            and len(set(value)) == len(value):
        return tuple(sorted(value))
    raise ValueError(f'{key} must be an integer n >= 1 (every n-th block: 0, n, 2n, ...) or a non-empty list of '
                     f'distinct block indices >= 0, got {value!r}')


def moe_layer_indices(moe_layers: MoeLayers, n_layers: int, key: str = 'moe_layers') -> list[int]:
    """The MoE blocks of an n_layers model; ValueError naming `key` for an index past the last block."""
    if moe_layers is None:
        return list(range(n_layers))
    if _is_int(moe_layers):
        return list(range(0, n_layers, moe_layers))
    past = [i for i in moe_layers if i >= n_layers]
    if past:
        raise ValueError(f'{key}: block(s) {past} do not exist (the model has {n_layers} blocks, 0..{n_layers - 1})')
    return list(moe_layers)
