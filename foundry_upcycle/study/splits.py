"""How a source of text splits into train, validation and test documents.

- test and val are filled first, from a seeded shuffle of the source's units, each unit giving ONE excerpt of at most
  `excerpt_chars` (starting at a seeded line): many short documents from many files, so that resampling the
  held-out documents means something. The rest of such a unit is not used anywhere.
- train takes whole units, the last one cut at a line end to fit its budget.
- A unit is one file, or a group of files that must stay together, for code and the user's folders: no file is in
  two splits. A long literary work (`Source.chapter_chars`) is cut into chapters, and its chapters are the units,
  so that a few plays or poems can give many held-out documents: chapters of one work may then sit in different
  splits (no text is shared). Each document records its `cluster` (the file or work it came from), which the
  study's jackknife resamples as one, so that excerpts of one work never count as independent.
"""
from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional

log = logging.getLogger(__name__)

SPLITS = ('train', 'val', 'test')
EVAL_SPLITS = ('test', 'val')           # filled first, in this order
EOS = '<|endoftext|>'
PAD = '<|pad|>'


_GUTENBERG_START = re.compile(r'^\*{3}\s*START OF (THIS|THE) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT', re.I | re.M)
_GUTENBERG_END = re.compile(r'^\*{3}\s*END OF (THIS|THE) PROJECT GUTENBERG.*$|^End of (the )?Project Gutenberg.*$',
                            re.I | re.M)


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


def read_text(path: Path) -> Optional[str]:
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
class Document:
    name: str
    text: str
    cluster: str = ''                    # the file or work it came from (one unit of the jackknife)


@dataclass(frozen=True)
class Source:
    """A pool of split units (tuples of files that must stay in one split) and how to name them.

    `key` seeds the split's shuffle: it names the source without its location, so that the same files split the
    same way on every machine (the standard library's folder differs between Python installs)."""
    what: str
    key: str
    root: Path
    groups: list[tuple[Path, ...]]
    clean: Callable[[str], str] = lambda s: s
    chapter_chars: Optional[int] = None  # long single-file works: cut into chapters of about this size


def truncate(text: str, budget: int) -> str:
    if len(text) <= budget:
        return text
    cut = text.rfind('\n', 0, budget)
    return text[:cut + 1 if cut > budget // 2 else budget]


def excerpt(text: str, chars: int, rng: random.Random) -> str:
    """At most `chars` characters of `text` from a seeded line start (the whole text if it is short)."""
    if len(text) <= chars:
        return text
    starts = [0] + [i + 1 for i in range(len(text) - chars) if text[i] == '\n']
    return truncate(text[rng.choice(starts):], chars)


def chapters(text: str, size: int) -> list[str]:
    """`text` in consecutive pieces of about `size` characters, each ending at a line end."""
    out = []
    while text:
        piece = truncate(text, size) if len(text) > 1.5 * size else text
        out.append(piece)
        text = text[len(piece):]
    return [c for c in out if c.strip()]


def _units(source: Source, order: list[tuple[Path, ...]], budgets: Mapping[str, int], excerpt_chars: int,
           read: Callable[[Path], Optional[str]], seed: int) -> tuple[list[list[tuple[str, str, Callable]]], int]:
    """The split units in their shuffled order: each a list of (name, cluster, text loader); and how many groups of
    `order` they use. A chaptered source takes works until their text covers the budgets (an eval document uses a
    whole chapter), then shuffles their chapters."""
    if not source.chapter_chars:
        return [[(str(p.relative_to(source.root)), str(group[0].relative_to(source.root)),
                  (lambda p=p: read(p))) for p in group] for group in order], len(order)
    need = budgets['train'] + sum(budgets[s] for s in EVAL_SPLITS) * source.chapter_chars / excerpt_chars
    units, have, used = [], 0, 0
    for group in order:
        if have >= 1.1 * need:
            break
        used += 1
        for path in group:
            text = read(path)
            if text is None:
                continue
            work = str(path.relative_to(source.root))
            for i, chapter in enumerate(chapters(text, source.chapter_chars)):
                units.append([(f'{work}#{i}', work, (lambda c=chapter: c))])
                have += len(chapter)
    random.Random(f'{seed}:{source.key}:chapters').shuffle(units)
    return units, used


def split_source(source: Source, budgets: Mapping[str, int], seed: int, excerpt_chars: int,
                 skipped: Optional[list[Path]] = None) -> tuple[dict[str, list[Document]], list[tuple[Path, ...]]]:
    """Seeded split by unit: test, then val (one excerpt per unit), then train (whole units), each within its
    character budget. Returns ({split: documents}, the groups left unused)."""
    order = list(source.groups)
    random.Random(f'{seed}:{source.key}').shuffle(order)

    def read(path: Path) -> Optional[str]:
        text = read_text(path)
        if text is None:
            if skipped is not None:
                skipped.append(path)
            return None
        return source.clean(text)

    units, used = _units(source, order, budgets, excerpt_chars, read, seed)
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    have = {s: 0 for s in SPLITS}
    taken = 0
    for unit in units:
        split = next((s for s in (*EVAL_SPLITS, 'train') if have[s] < budgets[s]), None)
        if split is None:
            break
        taken += 1
        for name, cluster, load in unit:
            if have[split] >= budgets[split]:
                break
            text = load()
            if text is None:
                continue
            if split == 'train':
                kept = truncate(text, budgets[split] - have[split])
            else:
                size = min(excerpt_chars, budgets[split] - have[split])
                kept = excerpt(text, size, random.Random(f'{seed}:{source.key}:{name}'))
            if kept.strip():
                out[split].append(Document(name, kept, cluster))
            # a cut training document fills its split (a line-end cut leaves a few characters of budget unused); an
            # excerpt counts as a full one
            if split == 'train':
                have[split] = budgets[split] if len(kept) < len(text) else have[split] + len(kept)
            else:
                have[split] += size if len(text) > size else len(kept)
    _check(source, out, have, budgets)
    return out, (order[taken:] if not source.chapter_chars else order[used:])


def _check(source: Source, out: Mapping[str, list[Document]], have: Mapping[str, int],
           budgets: Mapping[str, int]) -> None:
    if not out['test']:
        raise ValueError(f'{source.what} holds no readable UTF-8 text')
    if not out['train'] or not out['val']:
        raise ValueError(f'{source.what}: all readable text went to the held-out splits; it needs at least three '
                         'text files (split by file: test, then validation, then train), or lower the *_test_chars '
                         '/ *_val_chars budgets')
    if have['train'] < budgets['train']:
        log.warning('%s: only %d of the %d training characters asked for are available',
                    source.what, have['train'], budgets['train'])
