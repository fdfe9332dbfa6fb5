"""Small validators of user input shared by the study's typed configs: each raises ValueError naming the key."""
from __future__ import annotations

import math
import os
from typing import Any, Mapping, Optional, Sequence, Union

MAX_BUDGET = 10.0


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _positive_int(value: Any, key: str, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not _is_int(value) or value < 1:
        raise ValueError(f'{key} must be a positive integer, got {value!r}')


def _path_or_none(value: Any, key: str) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise ValueError(f'{key} must be a non-empty path, got {value!r}')
    return str(value)


def _reject_unknown(block: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    unknown = sorted(set(block) - set(allowed))
    if unknown:
        raise ValueError(f'{where}: unknown key(s) {unknown}; allowed keys are {sorted(allowed)}')


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f'{where} must be a mapping, got {type(value).__name__}')
    return dict(value)


def parse_numbers(value: str, where: str) -> tuple[float, ...]:
    """'5e-4, 1e-3' -> (0.0005, 0.001); ValueError naming `where` for anything else."""
    out = []
    for item in (s.strip() for s in value.split(',')):
        if not item:
            continue
        try:
            out.append(float(item))
        except ValueError:
            raise ValueError(f'{where}: {item!r} is not a number') from None
    return tuple(out)


def parse_budgets(value: Union[str, Sequence[Any]], where: str = 'budgets') -> tuple[float, ...]:
    """'0.25,0.5,1' or [0.25, 0.5, 1] -> (0.25, 0.5, 1.0): numbers in (0, MAX_BUDGET], no duplicates, sorted."""
    items = [s.strip() for s in value.split(',') if s.strip()] if isinstance(value, str) else list(value)
    if not items:
        raise ValueError(f'{where}: give at least one budget (fractions of the pretraining FLOPs, e.g. 0.1,0.5,1)')
    out = []
    for item in items:
        try:
            b = float(item) if isinstance(item, str) else item
        except ValueError:
            raise ValueError(f'{where}: {item!r} is not a number') from None
        if not _is_number(b) or not 0 < b <= MAX_BUDGET:
            raise ValueError(f'{where}: {item!r} is not a budget; each must be a number in (0, {MAX_BUDGET:g}] '
                             '(a fraction of the dense pretraining FLOPs)')
        out.append(float(b))
    dupes = sorted({b for b in out if out.count(b) > 1})
    if dupes:
        raise ValueError(f'{where}: duplicate budget(s) {[f"{b:g}" for b in dupes]}')
    return tuple(sorted(out))
