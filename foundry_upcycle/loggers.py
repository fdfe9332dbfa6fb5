"""Registered logger `jsonl`: every logged metric as one JSON line {"batch", "key", "value"} (rank 0 only).

Exact values for scripts and tests (the console rounds to 4 decimals), and the study's loss curves.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import torch
from composer.core import State
from composer.loggers import LoggerDestination
from composer.utils import dist


class JSONLLogger(LoggerDestination):

    def __init__(self, path: str):
        self.path = Path(path)
        self._file = None

    def init(self, state: State, logger: Any) -> None:
        if dist.get_global_rank() == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, 'a', buffering=1)

    def log_metrics(self, metrics: dict[str, Any], step: Optional[int] = None) -> None:
        if self._file is None:
            return
        for key, value in metrics.items():
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    continue
                value = value.item()
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._file.write(json.dumps({'batch': step, 'key': key, 'value': value}) + '\n')

    def close(self, state: State, logger: Any) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_jsonl(path: str) -> dict[str, list[tuple[int, float]]]:
    """{key: [(batch, value), ...]} from a JSONLLogger file."""
    out: dict[str, list[tuple[int, float]]] = {}
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        out.setdefault(row['key'], []).append((row['batch'], row['value']))
    return out
