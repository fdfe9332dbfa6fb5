"""The evaluation and inference-benchmark settings of a study (`eval:` and `inference:` blocks)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from foundry_upcycle.study.validators import _is_int, _path_or_none, _positive_int

SHIPPED_EVAL_DATA = Path(__file__).resolve().parent / 'eval_data'


def shipped_eval_data() -> Path:
    """The samples of the default gauntlet tasks shipped in the package (eval_data/SOURCES.md)."""
    return SHIPPED_EVAL_DATA


@dataclass(frozen=True)
class EvalConfig:
    """local_data: llm-foundry's `scripts/eval/local_data` checkout; 'auto' = the samples shipped in the package
    (the same on every machine), None = no ICL eval (cross-entropy only). tasks / max_examples_per_task: see
    gauntlet.GauntletSpec."""
    local_data: Optional[str] = 'auto'
    tasks: Union[str, tuple[str, ...]] = 'default'
    max_examples_per_task: Optional[int] = 40
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self):
        if self.local_data != 'auto':
            object.__setattr__(self, 'local_data', _path_or_none(self.local_data, 'eval.local_data'))
        if isinstance(self.tasks, (list, tuple)):
            object.__setattr__(self, 'tasks', tuple(self.tasks))
        elif self.tasks not in ('default', 'all'):
            raise ValueError(f"eval.tasks: expected 'default', 'all' or a list of task names, got {self.tasks!r}")
        _positive_int(self.max_examples_per_task, 'eval.max_examples_per_task', optional=True)
        _positive_int(self.batch_size, 'eval.batch_size')
        if not _is_int(self.seed):
            raise ValueError(f'eval.seed must be an integer, got {self.seed!r}')

    def resolved_local_data(self) -> Optional[str]:
        if self.local_data == 'auto':
            return str(shipped_eval_data())
        return self.local_data

    def local_data_id(self) -> Optional[str]:
        """What the eval data is, independent of where this checkout lives (for stage hashes and results.json)."""
        if self.local_data == 'auto':
            import hashlib
            h = hashlib.sha256()
            for f in sorted(shipped_eval_data().rglob('*.jsonl')):
                h.update(f.relative_to(shipped_eval_data()).as_posix().encode() + b'\0' + f.read_bytes())
            return f'shipped:{h.hexdigest()[:16]}'
        return self.local_data


@dataclass(frozen=True)
class InferenceConfig:
    """Export + benchmark of the largest-budget CPT and upcycled models. None: defaults for the device
    (CPU: 64 in / 16 out tokens, 8 requests, batches 1 and 4; GPU: the paper's 3500 / 300, 64 requests,
    batches 1-64), shortened to fit the model's max_seq_len."""
    skip: bool = False
    input_tokens: Optional[int] = None
    output_tokens: Optional[int] = None
    num_requests: Optional[int] = None
    batch_sizes: Optional[tuple[int, ...]] = None
    top_ks: Optional[tuple[int, ...]] = None      # None: 1 and the study's top_k

    def __post_init__(self):
        if not isinstance(self.skip, bool):
            raise ValueError(f'inference.skip must be true or false, got {self.skip!r}')
        for key in ('input_tokens', 'output_tokens'):
            _positive_int(getattr(self, key), f'inference.{key}', optional=True)
        _positive_int(self.num_requests, 'inference.num_requests', optional=True)
        for key in ('batch_sizes', 'top_ks'):
            value = getattr(self, key)
            if value is None:
                continue
            if not isinstance(value, (list, tuple)) or not value or not all(_is_int(v) and v > 0 for v in value):
                raise ValueError(f'inference.{key} must be a non-empty list of positive integers, got {value!r}')
            object.__setattr__(self, key, tuple(value))

